"""A VLM backbone with a scalar head: one reward per (image, prompt, response) sequence.

The reward is read from the final hidden state (after the LM's last norm) of each row's LAST
non-padding token, so left and right padding give the same score. Heads:

- ``linear``: Linear(hidden, 1), OpenRLHF's value head;
- ``mlp2``:   Linear(hidden, hidden) -> SiLU -> Linear(hidden, 1), BaseReward's.

On disk (``<output_dir>/final/``): the backbone in HF format with its processor (transformers loads it
as it loads a DPO ``final/``; LoRA is merged into the weights), ``reward_head.safetensors`` and
``reward_model.json`` (head type, hidden size, backbone folder, held-out reward statistics).
:func:`load_reward_model` rebuilds the model from that folder.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_model.json"
FORMAT = "csr-reward-model/1"
HEADS = ("linear", "mlp2")


def hidden_size(config) -> int:
    """The width of the language model's hidden states (a VLM config nests it in its text config)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


def make_head(kind: str, hidden: int) -> nn.Module:
    if kind not in HEADS:
        raise ValueError(f"reward head {kind!r} is unknown; use one of {', '.join(HEADS)} (rm.head).")
    last = nn.Linear(hidden, 1)
    # OpenRLHF's value-head init: rewards start near 0 with unit-scale variance, whatever the width
    nn.init.normal_(last.weight, std=1.0 / math.sqrt(hidden + 1))
    nn.init.zeros_(last.bias)
    if kind == "linear":
        return last
    return nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), last)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the last token with mask 1: the end of the sequence under either padding."""
    mask = attention_mask.long()
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("a row of the batch has no tokens (its attention mask is all 0)")
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (mask * positions).max(-1).values


def _hf_model(backbone):
    """The transformers model under a PEFT wrapper (LoRA layers stay inside it, in place)."""
    try:
        from peft import PeftModel
    except ImportError:   # peft is optional for scoring with a saved (merged) model
        return backbone
    return backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone


class MultimodalRewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: str = "linear"):
        super().__init__()
        self.backbone = backbone
        self.head_kind = head
        self.hidden_size = hidden_size(backbone.config)
        dtype = next(backbone.parameters()).dtype
        self.head = make_head(head, self.hidden_size).to(dtype)
        hf = _hf_model(backbone)
        if not hasattr(hf, "model"):
            raise ValueError(f"{type(hf).__name__} has no inner `.model` returning hidden states; the reward model "
                             "needs an AutoModelForImageTextToText checkpoint of a supported family.")
        # The LM head is never used: frozen, unless it shares its weight with the input embeddings.
        lm_head = getattr(hf, "lm_head", None)
        embeddings = hf.get_input_embeddings()
        if lm_head is not None and lm_head.weight is not getattr(embeddings, "weight", None):
            lm_head.weight.requires_grad = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_inputs) -> torch.Tensor:
        """One reward per row. ``model_inputs``: image tensors and per-token inputs (multimodal.batch_inputs)."""
        # The inner model returns last_hidden_state (after the final norm) without the vocabulary projection,
        # which for a 7B LM would be a [rows, length, 32k] tensor computed for nothing.
        out = _hf_model(self.backbone).model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                             **model_inputs)
        hidden = out.last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
        return self.head(last.to(self.head_weight_dtype())).squeeze(-1).float()

    def head_weight_dtype(self) -> torch.dtype:
        return next(self.head.parameters()).dtype


# ----------------------------------------------------------------------------------------------- saving
def split_state(state: dict, lora_alpha: Optional[int] = None, lora_rank: int = 0) -> tuple[dict, dict]:
    """A full MultimodalRewardModel state dict -> (backbone keys as transformers saves them, head keys).

    LoRA: each adapted weight becomes W + (alpha / r) * B @ A (PEFT's merge, in fp32, rounded once to W's
    dtype); the adapter keys are dropped and PEFT's ``base_model.model.`` / ``.base_layer`` levels removed.
    """
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v.contiguous() for k, v in state.items() if k.startswith("head.")}
    if lora_rank > 0:
        scale = (lora_alpha or lora_rank) / lora_rank
        for key in [k for k in backbone if ".lora_A." in k]:
            prefix, rest = key.split(".lora_A.", 1)
            adapter = rest.split(".", 1)[0]
            a, b = backbone.pop(key), backbone.pop(f"{prefix}.lora_B.{adapter}.weight")
            base = f"{prefix}.base_layer.weight"
            backbone[base] = (backbone[base].float() + scale * (b.float() @ a.float())).to(backbone[base].dtype)
        out = {}
        for key, value in backbone.items():
            if key.startswith("base_model.model."):
                key = key[len("base_model.model."):]
            out[key.replace(".base_layer.", ".")] = value
        backbone = out
    return backbone, head


def write_reward_model(folder: Path, hf_model, processor, backbone_state: dict, head_state: dict, head: str,
                       info: dict) -> None:
    """final/ from gathered weights (one process; folder replaced)."""
    from safetensors.torch import save_file

    from csr_plugin.checkpoint_layout import to_hub_layout

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    hf_model.save_pretrained(folder, state_dict=backbone_state)
    to_hub_layout(folder)   # the layout a DPO final/ has, which vLLM loads
    if processor is not None:
        processor.save_pretrained(folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in head_state.items()}, str(folder / HEAD_FILE))
    meta = {"format": FORMAT, "head": head, "hidden_size": hidden_size(hf_model.config), "backbone": ".",
            "head_file": HEAD_FILE,
            "reward": "head(final hidden state of the last non-padding token); no normalisation is applied",
            **info}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------- loading
def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
                      ) -> MultimodalRewardModel:
    """The reward model saved in ``path`` (a `csr train-rm` final/), in eval mode on CPU."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    folder = Path(path)
    meta_file = folder / CONFIG_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: give the final/ folder `csr train-rm` wrote "
                                "(it holds reward_model.json, reward_head.safetensors and the backbone).")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r} is not {FORMAT!r}; retrain with this csr.")
    backbone = AutoModelForImageTextToText.from_pretrained(folder / meta["backbone"], dtype=dtype,
                                                           trust_remote_code=trust_remote_code)
    model = MultimodalRewardModel(backbone, meta["head"])
    if model.hidden_size != meta["hidden_size"]:
        raise ValueError(f"{meta_file} says hidden_size {meta['hidden_size']} but the backbone in "
                         f"{folder / meta['backbone']} has {model.hidden_size}: the folder is mixed up.")
    head_state = load_file(str(folder / meta["head_file"]))
    model.head.load_state_dict({k: v.to(dtype) for k, v in head_state.items()})
    return model.to(dtype).eval()
