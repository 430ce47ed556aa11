from pathlib import Path

import pytest
import yaml

from csr_plugin.config import ConfigError, Recipe, load_recipe, recipe_from_dict, recipe_to_dict

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_validates_and_starts_with_its_launch_command(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    lines = path.read_text().splitlines()
    header = lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    assert header, f"{path.name} must start with a comment"
    assert any("csr " in line for line in header), f"{path.name}: the opening comment gives no launch command"


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"official.yaml", "paper.yaml", "tiny.yaml"}


def test_official_recipe_reproduces_the_official_code():
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "official.yaml")
    s = recipe.search
    assert (recipe.reward.fusion, recipe.reward.lambda_) == ("rank", 0.9)
    assert (s.calibration, s.decoding, s.candidates, s.keep_top, s.keep_bottom) == ("posthoc", "group_beam", 5, 1, 2)
    assert (s.diversity_penalty, s.max_new_tokens) == (3.0, 70)


def test_defaults_are_the_paper():
    recipe = recipe_from_dict({"model": {"path": "x"}})
    assert recipe.reward.lambda_ == 0.9 and recipe.reward.fusion == "paper"
    assert recipe.search.calibration == "online"
    assert recipe.clip.model == "ViT-L-14-336" and recipe.clip.pretrained == "openai"


@pytest.mark.parametrize("data, fragment", [
    ({"reward": {"lambda": 1.5}}, "`reward.lambda` must be in [0, 1], got 1.5"),
    ({"reward": {"lamda": 0.5}}, "unknown key `reward.lamda`"),
    ({"serach": {}}, "unknown key `serach`"),
    ({"search": {"beam_width": "3"}}, "`search.beam_width` must be an integer, got '3'"),
    ({"search": {"beam_width": 4}}, "must equal keep_top + keep_bottom"),
    ({"search": {"calibration": "live"}}, "`search.calibration` must be one of online, posthoc; got 'live'"),
    ({"search": {"candidates": 0}}, "`search.candidates` must be >= 1, got 0"),
    ({"search": {"top_p": 0}}, "`search.top_p` must be in (0, 1]"),
    ({"curation": {"length_normalize": "yes"}}, "`curation.length_normalize` must be true or false"),
    ({"model": {}}, "`model.path` is required"),
    ({"reward": 0.9}, "`reward` must be a mapping"),
])
def test_bad_values_fail_with_key_value_and_fix(data, fragment):
    data = {"model": {"path": "m"}, **data} if "model" not in data else data
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    assert fragment in str(err.value)


def test_overrides_reach_nested_keys_and_parse_as_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "m"}}))
    recipe = load_recipe(path, ["search.beam_width=4", "search.keep_bottom=3", "reward.lambda=0.5",
                                "search.delimiters=['.', ';']", "output_dir=runs/x"])
    assert recipe.search.beam_width == 4 and recipe.search.keep_bottom == 3
    assert recipe.reward.lambda_ == 0.5
    assert recipe.search.delimiters == [".", ";"]
    assert recipe.output_dir == "runs/x"
    with pytest.raises(ConfigError, match="unknown key `search.beams`"):
        load_recipe(path, ["search.beams=4"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_recipe(path, ["search.beam_width"])


def test_round_trip_uses_yaml_key_names():
    data = recipe_to_dict(recipe_from_dict({"model": {"path": "m"}, "reward": {"lambda": 0.3}}))
    assert data["reward"]["lambda"] == 0.3
    assert recipe_from_dict(data) == recipe_from_dict({"model": {"path": "m"}, "reward": {"lambda": 0.3}})


def test_missing_recipe_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="pass --config with a YAML file"):
        load_recipe(tmp_path / "nope.yaml")


def test_numbers_with_exponents_read_as_typed(tmp_path):
    """PyYAML (YAML 1.1) reads 3e-4 as a string; a recipe or override written that way is a number."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: m\ndpo:\n  lr: 5e-7\n")
    assert load_recipe(recipe).dpo.lr == 5e-7
    assert load_recipe(recipe, ["dpo.lr=3e-4"]).dpo.lr == 3e-4
    assert load_recipe(recipe, ["dpo.beta=1E-1"]).dpo.beta == 0.1
    with pytest.raises(ConfigError, match="must be a number"):
        load_recipe(recipe, ["dpo.lr=3e-four"])


def test_a_bare_off_reads_as_the_word_not_a_bool(tmp_path):
    """PyYAML (YAML 1.1) reads a bare off as False; a choice whose word it is takes the word back."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: m\nreward:\n  yes_no: off\n")
    assert load_recipe(recipe).reward.yes_no == "off"
    assert load_recipe(recipe, ["reward.yes_no=off"]).reward.yes_no == "off"
    with pytest.raises(ConfigError, match="must be one of off, claim; got True"):
        load_recipe(recipe, ["reward.yes_no=on"])   # no "on" among the choices: still an error
