"""Image relevance R_I(s) = max(100 * cos(F_I(x_v), F_T(s)), 0) with open_clip.

The image embedding is the same for every sentence about an image, so it is
computed once and cached; sentences are scored in batches. CLIP's text encoder
has a fixed context (77 tokens for OpenAI CLIP): longer sentences are truncated
by the open_clip tokenizer, keeping their start and the end-of-text token, which
is the part CLIP was trained to read.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Hashable, Sequence

import torch
from PIL import Image

# resolve_device lives in accelerator.py; kept importable from here for the engines that import it so
from csr_plugin.accelerator import resolve_device
from csr_plugin.config import ClipConfig


def _import_open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("CLIP relevance needs open_clip: pip install open_clip_torch") from exc
    return open_clip


class ClipRelevance:
    """Scores sentences against images; one instance per process (the model loads once)."""

    def __init__(self, cfg: ClipConfig):
        open_clip = _import_open_clip()
        model_name = cfg.model
        if cfg.config:
            config_path = Path(cfg.config)
            if not config_path.is_file():
                raise FileNotFoundError(f"clip.config {cfg.config!r} is not a file; give an open_clip "
                                        "model-config JSON or set clip.config: null.")
            open_clip.add_model_config(config_path)
            model_name = config_path.stem
        pretrained = cfg.pretrained
        if pretrained and any(sep in pretrained for sep in ("/", "\\")) and not Path(pretrained).is_file():
            raise FileNotFoundError(f"clip.pretrained {pretrained!r} looks like a path but is not a file.")
        self.device = resolve_device(cfg.device)
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, device=self.device)
        except Exception as exc:  # noqa: BLE001 - a short error naming the keys; the CLI logs the traceback
            from csr_plugin.recipe_paths import clip_load_failure

            raise clip_load_failure(cfg.model, pretrained, exc) from exc
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._cache: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._cache_size = cfg.cache_images

    @torch.inference_mode()
    def image_embedding(self, key: Hashable, image: Image.Image) -> torch.Tensor:
        """Unit-norm embedding of ``image``, computed once per ``key`` (e.g. its path)."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pixels = self.preprocess(image.convert("RGB")).unsqueeze(0).to(self.device)
        embedding = self.model.encode_image(pixels, normalize=True)[0].float()
        self._cache[key] = embedding
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return embedding

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)  # truncates to the model's context
        if self._can_trim_padding():
            return self._encode_text_trimmed(tokens)
        return self.model.encode_text(tokens, normalize=True).float()

    def _can_trim_padding(self) -> bool:
        # OpenAI-style CLIP: causal text attention pooled at the end-of-text token, so positions
        # after the longest sentence's EOT cannot change any embedding. Sentences are ~20 of 77
        # tokens: cutting the padding makes the text tower ~3x cheaper with identical output.
        model = self.model
        return (type(model).__name__ == "CLIP" and getattr(model, "text_pool_type", None) == "argmax"
                and getattr(model, "attn_mask", None) is not None and getattr(model, "cls_emb", None) is None)

    def _encode_text_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        length = int(tokens.argmax(dim=-1).max()) + 1  # EOT has the largest id in CLIP's vocabulary
        tokens = tokens[:, :length]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
        return torch.nn.functional.normalize(x, dim=-1).float()

    def relevance(self, image_embeddings: torch.Tensor, texts: Sequence[str]) -> list[float]:
        """R_I for each (image embedding row, text) pair, in one text batch."""
        if len(texts) == 0:
            return []
        text = self.text_embeddings(texts)
        cosine = (image_embeddings.to(text.device) * text).sum(-1)
        return (100.0 * cosine).clamp_min(0.0).tolist()

    def score(self, items: Sequence[tuple[Hashable, Image.Image, str]]) -> list[float]:
        """R_I for (image key, image, sentence) triples; images embedded once each."""
        if not items:
            return []
        images = torch.stack([self.image_embedding(key, image) for key, image, _ in items])
        return self.relevance(images, [text for _, _, text in items])
