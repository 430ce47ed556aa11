"""Checkpoints in the key layout of the hub, which vLLM loads.

transformers 5 keeps a LLaVA's CLIP/SigLIP vision tower without its
``vision_model.`` level and writes it that way when the model was built from a
config (the toy and tiny models) or saved from a bare state dict: keys
``vision_tower.embeddings.*``. Hub checkpoints (llava-hf/*) have
``vision_tower.vision_model.embeddings.*``; transformers loads both, vLLM 0.29
only the hub one ("There is no module or parameter named
'vision_tower.embeddings'"). :func:`to_hub_layout` rewrites a saved folder's
safetensors in place; it is a no-op on a checkpoint already in hub layout.

    python -m csr_plugin.checkpoint_layout FOLDER    # convert a checkpoint saved before this existed
"""
from __future__ import annotations

import json
from pathlib import Path

# Model types whose vision tower is a transformers CLIPVisionModel / SiglipVisionModel under
# `vision_tower` (hub key `vision_tower.vision_model.*`).
_WRAPPED_VISION_TOWER = {"llava", "llava_next", "vipllava"}
_TOWER, _HUB_TOWER = "vision_tower.", "vision_tower.vision_model."


def _hub_key(key: str) -> str:
    if key.startswith(_TOWER) and not key.startswith(_HUB_TOWER):
        return _HUB_TOWER + key[len(_TOWER):]
    return key


def _wrapped_tower(folder: Path) -> bool:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{folder} has no config.json: give the folder a model was saved to.")
    return json.loads(config_file.read_text()).get("model_type") in _WRAPPED_VISION_TOWER


def needs_hub_layout(folder: str | Path) -> bool:
    """Whether a local checkpoint has keys vLLM cannot load until :func:`to_hub_layout` renames them."""
    from safetensors import safe_open

    folder = Path(folder)
    if not _wrapped_tower(folder):
        return False
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            if any(_hub_key(key) != key for key in f.keys()):
                return True
    return False


def to_hub_layout(folder: str | Path) -> int:
    """Rename the checkpoint's keys in ``folder`` to the hub layout; returns how many keys changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    if not _wrapped_tower(folder):
        return 0
    changed = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        renamed = {_hub_key(key): value for key, value in tensors.items()}
        moved = sum(new != old for new, old in zip(renamed, tensors))
        if moved:
            tmp = shard.with_suffix(".tmp")
            save_file(renamed, str(tmp), metadata=metadata)
            tmp.replace(shard)  # a crash leaves the old shard or the new one, never half of one
            changed += moved
    index = folder / "model.safetensors.index.json"
    if changed and index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {_hub_key(key): shard for key, shard in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return changed


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m csr_plugin.checkpoint_layout CHECKPOINT_FOLDER")
    print(f"{to_hub_layout(sys.argv[1])} keys renamed to the hub layout in {sys.argv[1]}")
