"""Cheap checks before expensive ones: a wrong path in a recipe fails before any model or CLIP loads,
names the key and the fix, in a few lines; a CLIP that exists but does not load is a short `csr:` error
with its traceback in the log (not on the terminal)."""
import json

import pytest
import yaml

from csr_plugin import cli
from csr_plugin.reward import clip_relevance
from csr_plugin.sampling import local
from test_quiet import restore_logging  # noqa: F401 - fixture: cli.main sets up logging


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading any model fails the test: the checks must decide before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model or CLIP was loaded before the recipe's paths were checked")
    monkeypatch.setattr(local, "build_engine", refuse)
    monkeypatch.setattr(local, "build_clip", refuse)
    monkeypatch.setattr(clip_relevance.ClipRelevance, "__init__", refuse)


def _run(capsys, argv):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def _recipe(tmp_path, base, **sections):
    data = json.loads(json.dumps(base))
    for key, value in sections.items():
        section, _, name = key.partition("__")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("change, key, fix", [
    ({"model__path": "/nonexistent/llava"}, "`model.path` '/nonexistent/llava' does not exist",
     "give a local Hugging Face model folder"),
    ({"clip__pretrained": "/nonexistent/clip.pt"}, "`clip.pretrained` '/nonexistent/clip.pt' does not exist",
     "open_clip weights file"),
    ({"clip__config": "/nonexistent/clip.json"}, "`clip.config` '/nonexistent/clip.json' does not exist",
     "model-config JSON"),
    ({"data__prompts": "/nonexistent/prompts.jsonl"}, "`data.prompts` '/nonexistent/prompts.jsonl' does not exist",
     "JSONL file of"),
    # a seed no run here builds (seeds 0-9 are built for docs/results.md):
    ({"model__path": ".cache/toy/seed9071/vlm"}, "`model.path` '.cache/toy/seed9071/vlm' does not exist",
     "`csr demo --build-only` builds"),
])
@pytest.mark.parametrize("command", ["sample", "run", "train-ppo"])
def test_a_missing_path_fails_before_anything_loads(command, change, key, fix, tmp_path, tiny_recipe_dict,
                                                     nothing_loads, capsys, restore_logging):
    config = _recipe(tmp_path, tiny_recipe_dict, output_dir=str(tmp_path / "out"), **change)
    code, text = _run(capsys, [command, "--config", config])
    assert code == 2 and key in text and fix in text, text
    assert len(text.splitlines()) < 10, text
    assert "Traceback" not in text


def test_images_in_another_folder_name_the_prompts_file(tmp_path, tiny_recipe_dict, nothing_loads, capsys,
                                                         restore_logging):
    prompts = tmp_path / "prompts.jsonl"   # relative images that are not next to this file
    prompts.write_text("".join(json.dumps({"id": i, "image": f"img{i}.png", "question": "q"}) + "\n"
                               for i in range(3)))
    config = _recipe(tmp_path, tiny_recipe_dict, output_dir=str(tmp_path / "out"), data__prompts=str(prompts))
    code, text = _run(capsys, ["sample", "--config", config])
    assert code == 2 and "`data.prompts`" in text and "none of the first 3 prompts' images exists" in text, text


@pytest.mark.parametrize("key", ["truth", "vocabulary"])
def test_run_checks_the_eval_files_before_the_first_iteration(key, tmp_path, tiny_recipe_dict, nothing_loads,
                                                               capsys, restore_logging):
    existing = tmp_path / "exists.jsonl"
    existing.write_text("{}\n")
    evaluation = {"prompts": str(existing), "truth": str(existing), "vocabulary": str(existing),
                  key: str(tmp_path / "missing")}
    config = _recipe(tmp_path, tiny_recipe_dict, output_dir=str(tmp_path / "out"), eval=evaluation)
    code, text = _run(capsys, ["run", "--config", config])
    assert code == 2 and f"`eval.{key}`" in text and "`csr prepare coco` writes it" in text, text


def test_a_hub_id_offline_and_not_cached_is_named_as_such(tmp_path, tiny_recipe_dict, nothing_loads, capsys,
                                                          restore_logging, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))   # an empty hub cache
    config = _recipe(tmp_path, tiny_recipe_dict, output_dir=str(tmp_path / "out"),
                     model__path="no-such-org/no-such-vlm")
    code, text = _run(capsys, ["sample", "--config", config])
    assert code == 2 and "`model.path` 'no-such-org/no-such-vlm' is a Hugging Face hub id" in text, text
    assert "HF_HUB_OFFLINE is set" in text and "huggingface-cli download" in text


def test_a_folder_that_is_not_a_model(tmp_path, tiny_recipe_dict, nothing_loads, capsys, restore_logging):
    (tmp_path / "empty").mkdir()
    config = _recipe(tmp_path, tiny_recipe_dict, output_dir=str(tmp_path / "out"),
                     model__path=str(tmp_path / "empty"))
    code, text = _run(capsys, ["train-dpo", "--config", config, f"dpo.pairs={config}"])
    assert code == 2 and "has no config.json: not a Hugging Face model folder" in text, text


def test_a_model_of_an_unsupported_family_is_named_before_anything_loads(tmp_path, tiny_recipe_dict, nothing_loads,
                                                                          capsys, restore_logging):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    config = _recipe(tmp_path, tiny_recipe_dict, output_dir=str(tmp_path / "out"), model__path=str(tmp_path / "bert"))
    code, text = _run(capsys, ["sample", "--config", config])
    assert code == 2 and "`model.path`" in text and "'bert' is not a supported VLM family" in text, text


def test_a_clip_that_does_not_load_is_a_short_error_with_the_traceback_in_the_log(
        tmp_path, tiny_recipe_dict, capsys, restore_logging, monkeypatch):
    monkeypatch.setattr(local, "build_engine", lambda *a, **k: pytest.fail("the VLM loaded before CLIP failed"))
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"not a checkpoint")
    config = _recipe(tmp_path, tiny_recipe_dict, output_dir=str(tmp_path / "out"), clip__pretrained=str(weights))
    code, text = _run(capsys, ["sample", "--config", config])
    assert code == 2 and "CLIP `clip.model` 'tiny-clip' with `clip.pretrained`" in text, text
    assert "did not load" in text and "Fix:" in text and "Traceback" not in text
    assert len(text.splitlines()) < 10, text
    assert "Traceback" in (tmp_path / "out" / "logs" / "csr.log").read_text()


def test_a_model_whose_weights_do_not_load_is_a_short_error_with_the_traceback_in_the_log(
        tmp_path, tiny_recipe_dict, capsys, restore_logging):
    """The folder passes the path checks (config.json, processor) but its weights file is truncated."""
    import shutil

    broken = tmp_path / "vlm"
    shutil.copytree(tiny_recipe_dict["model"]["path"], broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:1000])
    config = _recipe(tmp_path, tiny_recipe_dict, output_dir=str(tmp_path / "out"), model__path=str(broken))
    code, text = _run(capsys, ["sample", "--config", config])
    assert code == 2 and f"`model.path` {str(broken)!r} did not load" in text and "Fix:" in text, text
    assert "Traceback" not in text and len(text.splitlines()) < 10, text
    assert "Traceback" in (tmp_path / "out" / "logs" / "csr.log").read_text()
