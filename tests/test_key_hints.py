"""Unknown keys get "did you mean": a near spelling in the section, an OpenRLHF flag name's recipe key, a
key of another section, or the section's `openrlhf:` passthrough; dtypes take either spelling everywhere."""
import pytest

from csr_plugin import cli
from csr_plugin.config import ConfigError, load_recipe

PAPER = "recipes/paper.yaml"


@pytest.mark.parametrize("override, hint", [
    ("model.beta=0.2", "`model.beta` is OpenRLHF's `--model.beta`, which the recipe key `dpo.beta` sets"),
    ("reward.clip_range=[-5,5]", "`--reward.clip_range`, which the recipe key `ppo.reward_clip` sets"),
    ("dpo.train_batch_size=16", "`--train.batch_size`, which the recipe key `dpo.batch` sets"),
    ("ppo.train_batch_size=16", "which the recipe key `ppo.train_batch` sets"),
    ("search.lr=1e-5", "did you mean `dpo.lr` or `rm.lr`?"),
    ("dpo.adam_offload=true", "goes under `dpo.openrlhf`, e.g. dpo.openrlhf.adam_offload="),
])
def test_openrlhf_reflexes_get_the_recipe_key(override, hint, capsys):
    assert cli.main(["recipe", "show", PAPER, override]) == 2
    err = capsys.readouterr().err
    assert f"unknown key `{override.split('=')[0]}`" in err and hint in err, err
    assert len(err.splitlines()) <= 3, err


def test_near_spelling_is_named_by_the_config_itself():
    with pytest.raises(ConfigError, match=r"unknown key `dpo.bta`. Did you mean `dpo.beta`\?") as exc:
        load_recipe(PAPER, ["dpo.bta=0.2"])
    assert exc.value.unknown_key == "dpo.bta"
    with pytest.raises(ConfigError, match=r"Did you mean `search.beam_width`\?"):
        load_recipe(PAPER, ["search.beam_widht=2"])


def test_a_near_spelling_gets_no_passthrough_hint(capsys):
    assert cli.main(["recipe", "show", PAPER, "dpo.bta=0.2"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean `dpo.beta`" in err and "hint:" not in err


@pytest.mark.parametrize("key", ["model.dtype", "dpo.dtype", "rm.dtype"])
@pytest.mark.parametrize("short, long", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_every_dtype_key_takes_both_spellings(key, short, long):
    section, name = key.split(".")
    values = {getattr(getattr(load_recipe(PAPER, [f"{key}={v}"]), section), name) for v in (short, long)}
    assert len(values) == 1 and values <= {short, long}   # the same setting, in the section's own spelling


def test_fp16_is_refused_where_the_trainer_has_none():
    assert load_recipe(PAPER, ["model.dtype=fp16"]).model.dtype == "float16"
    with pytest.raises(ConfigError, match="`dpo.dtype` must be one of auto, bf16, fp32; got 'float16'"):
        load_recipe(PAPER, ["dpo.dtype=float16"])
