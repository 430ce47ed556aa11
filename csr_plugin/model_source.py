"""What a recipe's `model:` section resolves to, decided in one place for every engine and trainer (its
device and dtype: accelerator.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

DEFAULT_CONTEXT = 4096   # when neither the config nor the tokenizer states a limit
# The original LLaVA release (liuhaotian/llava-v1.5-7b and kin) loads only with its own repository's code.
ORIGINAL_LLAVA_TYPES = {"llava_llama", "llava_mistral", "llava_mpt", "llava_qwen"}


def check_model_path(path: str) -> Path:
    """``path`` as a local folder, or left as a hub id; FileNotFoundError for a local-looking path that is absent."""
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise FileNotFoundError(f"model.path {path!r} does not exist; give a local HF model folder or hub id.")
    config = local / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            model_type = None   # transformers reports a broken config with its own words
        if model_type in ORIGINAL_LLAVA_TYPES:
            from csr_plugin.config import ConfigError

            raise ConfigError(f"model.path {path!r} is in the original LLaVA release's format (model_type "
                              f"{model_type!r}); csr loads the llava-hf format: use llava-hf/llava-1.5-7b-hf, or "
                              "convert the folder with transformers' convert_llava_weights_to_hf.py "
                              "(docs/families.md, \"Checkpoint formats\").")
    return local


def context_length(config, tokenizer=None) -> int:
    """The longest prompt + response the model takes: its text config's position limit and, if given,
    the tokenizer's ``model_max_length`` (tokenizers without one report a huge sentinel, ignored)."""
    text_config = getattr(config, "text_config", None) or config
    limits: list[Optional[int]] = [getattr(text_config, "max_position_embeddings", None)]
    if tokenizer is not None:
        limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**8]
    return min(limits) if limits else DEFAULT_CONTEXT
