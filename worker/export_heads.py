"""The heads the export helper traces after an encoder (export helper process, with torch): one torch module per
`graph_cache` head kind, each a function of the tokenizer's named inputs returning the head's output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sie_worker.adapters.graph_cache import (
    CLIP_IMAGE,
    CLIP_TEXT,
    HIDDEN,
    HYBRID,
    HYBRID_HEADS,
    SEQUENCE_LOGITS,
    TOKEN_LOGITS,
)
from sie_worker.adapters.hybrid_heads import HEAD_FILES
from sie_worker.adapters.torch_common import load_encoder

# The tokenizer's special tokens a lean worker may need by role (ColBERT's query expansion, its skiplist).
SPECIAL_ROLES = ("pad", "mask", "unk", "cls", "sep", "bos", "eos")


class LastHidden(torch.nn.Module):
    """The encoder's last hidden state [B, T, H]."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(**inputs).last_hidden_state
        return out


class Logits(torch.nn.Module):
    """A classification head's logits in float32: [B, labels] per sequence, [B, T, labels] per token."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(**inputs).logits.float()
        return out


class SpladeWeights(torch.nn.Module):
    """SPLADE term weights [B, vocabulary] from a masked LM, as `sparse.splade_pool` computes them: logits masked,
    relu, log1p (twice for `log1p_relu`), then max or sum over the tokens."""

    def __init__(self, model: torch.nn.Module, strategy: str, activation: str) -> None:
        super().__init__()
        self.model, self.strategy, self.activation = model, strategy, activation

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        logits = self.model(**inputs).logits
        masked = logits * inputs["attention_mask"].unsqueeze(-1).to(logits.dtype)
        if self.strategy == "max":
            # relu and log1p never decrease, so the max over tokens commutes with them: taken first, exactly, they
            # run on [B, vocabulary] instead of [B, tokens, vocabulary] (two passes fewer over the largest tensor).
            return self.activate(masked.amax(dim=1))
        return self.activate(masked).sum(dim=1)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.log1p(torch.relu(x))
        return torch.log1p(weights) if self.activation == "log1p_relu" else weights


class ClipTower(torch.nn.Module):
    """A CLIP tower with its projection, unnormalised [B, D]: `get_text_features` over token ids or
    `get_image_features` over pixel values, as the torch CLIP adapter calls them."""

    def __init__(self, model: torch.nn.Module, image: bool) -> None:
        super().__init__()
        self.model, self.image = model, image

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        features = self.model.get_image_features if self.image else self.model.get_text_features
        out: torch.Tensor = features(**inputs).pooler_output.float()
        return out


def head_model(weights_dir: Path, head: str) -> Any:
    """The checkpoint in float32 under `head`, in eval mode; ValueError for a head this helper does not know."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    if head in (HIDDEN, HYBRID):
        return LastHidden(load_encoder(weights_dir, torch.float32)).eval()
    if head in (SEQUENCE_LOGITS, TOKEN_LOGITS):
        auto = AutoModelForSequenceClassification if head == SEQUENCE_LOGITS else AutoModelForTokenClassification
        return Logits(auto.from_pretrained(weights_dir, local_files_only=True, dtype=torch.float32)).eval()
    if head in (CLIP_TEXT, CLIP_IMAGE):
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(weights_dir, local_files_only=True, dtype=torch.float32)
        return ClipTower(clip, head == CLIP_IMAGE).eval()
    kind, _, rest = head.partition("-")
    strategy, _, activation = rest.partition("-")
    if kind == "splade" and strategy in ("max", "sum") and activation in ("relu", "log1p_relu"):
        model = AutoModelForMaskedLM.from_pretrained(weights_dir, local_files_only=True, dtype=torch.float32)
        return SpladeWeights(model, strategy, activation).eval()
    raise ValueError(f"unknown graph head {head!r}")


def write_head_files(weights_dir: Path, head: str, folder: Path) -> None:
    """What a head's numpy step reads beside its graph, into `folder`: for HYBRID, BGE-M3's linear heads as float32
    arrays named `<head>.weight` and `<head>.bias` (graph_cache.HYBRID_HEADS)."""
    if head != HYBRID:
        return
    arrays: dict[str, np.ndarray] = {}
    for name, file in HEAD_FILES.items():
        state = torch.load(weights_dir / file, map_location="cpu", weights_only=True)
        arrays.update({f"{name}.{key}": value.float().numpy() for key, value in state.items()})
    np.savez(folder / HYBRID_HEADS, **arrays)


def special_ids(tokenizer: Any) -> dict[str, int]:
    found = {role: getattr(tokenizer, f"{role}_token_id", None) for role in SPECIAL_ROLES}
    return {role: int(i) for role, i in found.items() if i is not None}
