"""Cheap checks before expensive work: every file and folder a command's recipe names, checked before
any model loads, so a wrong path fails in seconds with the key that names it instead of minutes later
inside a library's traceback (a missing model.path used to surface as a CLIP failure after CLIP loaded).

The GPU stack is checked separately (doctor.preflight); this module only looks at the recipe's paths.
A model or CLIP that exists but will not load is a :class:`LoadFailure`: the CLI prints its message
(key, path, fix) and writes the traceback to the command's log.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from csr_plugin.config import ConfigError, Recipe
from csr_plugin.model_source import check_model_path

# The toy recipes point into the cache `csr demo` fills (csr_plugin/toy/demo.py's default cache folder).
TOY_CACHE = ".cache/toy"
TOY_FIX = "`csr demo --build-only` builds the toy world and its models there (once, minutes)"
# What each command reads; `csr demo` builds its own inputs and `csr curate` reads only its --trees.
COMMANDS = ("sample", "run", "train-dpo", "train-rm", "eval", "train-ppo", "serve-reward")
_SEARCHING = ("sample", "run", "train-ppo", "serve-reward")   # these load CLIP (or the reward model)
_PROMPTS_READ = 20   # prompts whose images are looked at: enough to tell a wrong folder from a few bad lines


class LoadFailure(ConfigError):
    """A model or CLIP that exists but does not load: the message names the key, the path and the fix."""


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _missing(key: str, path: str, what: str) -> ConfigError:
    fix = TOY_FIX if TOY_CACHE in Path(path).as_posix() else what
    return ConfigError(f"`{key}` {path!r} does not exist; {fix}.")


def check_file(key: str, path: str, what: str) -> None:
    if not Path(path).expanduser().is_file():
        raise _missing(key, path, what)


def check_folder(key: str, path: str, what: str) -> None:
    if not Path(path).expanduser().is_dir():
        raise _missing(key, path, what)


def check_model(key: str, path: str, trust_remote_code: bool = False) -> None:
    """A local HF model folder, or a hub id (`org/name`); offline, a hub id must be in the local cache.
    Reads the model's config (transformers' AutoConfig, no weights) so an unknown or broken model
    fails here too."""
    local = Path(path).expanduser()
    # `runs/iter1` is a path whose folder exists here; `llava-hf/llava-1.5-7b-hf` a hub id
    hub_id = not local.exists() and path.count("/") == 1 and not path.startswith((".", "/", "~")) \
        and not local.parent.is_dir()
    if not local.exists() and not hub_id:
        raise _missing(key, path, "give a local Hugging Face model folder (with config.json) or a hub id (org/name)")
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(f"`{key}` {path!r} has no config.json: not a Hugging Face model folder. Give the folder "
                          "that holds config.json (for `csr train-dpo` output: its final/).")
    if hub_id and hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise ConfigError(f"`{key}` {path!r} is a Hugging Face hub id, and HF_HUB_OFFLINE is set: it is not in "
                              f"the local hub cache. Download it where there is network (`huggingface-cli download "
                              f"{path}`), unset HF_HUB_OFFLINE, or give a local folder.")
    check_model_path(path)   # the original LLaVA release's format, refused with its conversion
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any loader error becomes the key's error; the traceback is logged
        raise LoadFailure(f"`{key}` {path!r} does not load as a model config: {_first_line(exc)}. Give a model "
                          "transformers can load (docs/families.md lists the supported families).") from exc
    from csr_plugin.multimodal import UnsupportedModelError, family_of

    try:
        family_of(config)   # what the engines check before the weights, here before CLIP and the prompts load
    except UnsupportedModelError as exc:
        raise ConfigError(f"`{key}` {path!r}: {exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].rstrip('.') if text else ''}"[:300]


def model_load_failure(path: str, exc: BaseException) -> LoadFailure:
    """What sampling/transformers_engine.py raises when a model folder that passed the checks does not load."""
    return LoadFailure(f"`model.path` {path!r} did not load: {_first_line(exc)}. Fix: check that the folder holds "
                       "the weights its config.json names (*.safetensors) and its processor files, whole; the "
                       "traceback is in the log.")


def clip_load_failure(model: str, pretrained: Optional[str], exc: BaseException) -> LoadFailure:
    """What reward/clip_relevance.py raises when open_clip cannot build or load CLIP."""
    if pretrained and not any(sep in pretrained for sep in ("/", "\\")) and hub_offline():
        fix = (f"open_clip downloads the {pretrained!r} weights, and HF_HUB_OFFLINE is set: set clip.pretrained "
               "to a local weights file (clip.config to its model config), or run once with network")
    else:
        fix = ("check clip.model (an open_clip model name, or clip.config's JSON) and clip.pretrained (an open_clip "
               "tag such as openai, or a local weights file made for that model)")
    return LoadFailure(f"CLIP `clip.model` {model!r} with `clip.pretrained` {pretrained!r} did not load: "
                       f"{_first_line(exc)}. Fix: {fix}.")


def _check_clip(recipe: Recipe) -> None:
    clip = recipe.clip
    if clip.config:
        check_file("clip.config", clip.config, "give an open_clip model-config JSON or set clip.config: null")
    pretrained = clip.pretrained or ""
    if any(sep in pretrained for sep in ("/", "\\")) or pretrained.endswith((".pt", ".bin", ".safetensors")):
        check_file("clip.pretrained", pretrained, "give a local open_clip weights file or an open_clip tag (openai)")


def _check_prompts(recipe: Recipe) -> None:
    from csr_plugin.sampling.prompts import load_prompts

    check_file("data.prompts", recipe.data.prompts, 'give a JSONL file of {"id", "image", "question"} records')
    prompts, _ = load_prompts(recipe.data.prompts, limit=_PROMPTS_READ)
    # one missing image is a bad prompt (errors.jsonl); none found among the first ones is a wrong folder
    if prompts and not any(Path(p.image).is_file() for p in prompts):
        raise ConfigError(f"`data.prompts` {recipe.data.prompts!r}: none of the first {len(prompts)} prompts' "
                          f"images exists (e.g. {prompts[0].image}). A relative image resolves against the prompts "
                          "file's folder: move the file next to its images, or write absolute image paths.")


def _check_eval(recipe: Recipe, responses: bool) -> None:
    ev = recipe.eval
    if ev.prompts and not responses:
        check_file("eval.prompts", ev.prompts, "`csr prepare coco` writes it (docs/evaluation.md)")
    for key in ("truth", "vocabulary"):
        if getattr(ev, key):
            check_file(f"eval.{key}", getattr(ev, key), "`csr prepare coco` writes it (docs/evaluation.md)")
    for setting, path in ev.pope_questions.files().items():
        check_file(f"eval.pope_questions.{setting}", path, "`csr prepare coco` writes it (docs/evaluation.md)")
    if ev.pope_images:
        check_folder("eval.pope_images", ev.pope_images, "give the folder POPE's relative images are in")


def check_recipe_paths(recipe: Recipe, command: str, model: Optional[str] = None, responses: bool = False) -> None:
    """Every path ``command`` will read from ``recipe`` (``model``: a --model in place of model.path;
    ``responses``: `csr eval --responses`, no model loaded). ConfigError naming the first that is wrong."""
    if command not in COMMANDS:
        raise ValueError(f"check_recipe_paths: unknown command {command!r}; one of {', '.join(COMMANDS)}")
    if command in _SEARCHING:
        # reward.mrm, search.rm and eval.rm are checked by reward/source.py's loader before any model loads
        if recipe.reward.source == "clip":
            _check_clip(recipe)
        if recipe.reward.yes_no == "claim":
            check_file("reward.claim_vocabulary", recipe.reward.claim_vocabulary,
                       'give an objects JSON ({"objects": {name: [forms]}}), e.g. the one eval.vocabulary uses')
    if command in ("sample", "run", "train-ppo"):
        _check_prompts(recipe)
    if command == "run":
        if recipe.loop.holdout:
            check_file("loop.holdout", recipe.loop.holdout, 'give held-out prompts JSONL {"id", "image", "question"} '
                       "that data.prompts does not hold, or set loop.holdout: ''")
        if recipe.data.truth:
            check_file("data.truth", recipe.data.truth, "give the prompts' ground truth JSONL {id, objects}, or ''")
    if command in ("run", "train-dpo") and recipe.dpo.sft_data:
        check_file("dpo.sft_data", recipe.dpo.sft_data, "give the SFT examples JSONL, or set dpo.sft_data: ''")
    if command in ("run", "eval") and (recipe.eval.prompts or responses):
        _check_eval(recipe, responses)
    # last: a hub id is looked up on the hub (its config.json), the only check that may wait on the network
    if not responses:
        check_model("--model" if model else "model.path", model or recipe.model.path, recipe.model.trust_remote_code)
