"""Reference computations for the retrieval families, run in the test process on a checkpoint folder (CPU).

Shared by the adapter tests (tests/adapters) and the end-to-end and compat tests, which compare what the server
returns with these on the same checkpoints.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertModel

from tests.tiny_models import HFColBERT

# ColBERT layout -> (query marker, document marker, query cap, document cap), as the tiny checkpoints declare them.
COLBERT_LAYOUTS = {"stanford": ("[unused0]", "[unused1]", 8, 64), "pylate": ("[Q] ", "[D] ", 8, 64)}


def splade(weights_dir: Path, texts: list[str], max_length: int = 128) -> np.ndarray:
    """[items, vocab]: max over non-padding tokens of log1p(relu(MLM logits)), in one padded batch."""
    tokenizer = AutoTokenizer.from_pretrained(weights_dir)
    model = AutoModelForMaskedLM.from_pretrained(weights_dir).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**encoded).logits
    weights = torch.log1p(torch.relu(logits)) * encoded["attention_mask"].unsqueeze(-1)
    return weights.max(dim=1).values.numpy()


def _colbert_weights(layout: str, weights_dir: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    """(encoder, projection weight), read the way each layout's own code reads them."""
    if layout == "stanford":
        model = HFColBERT.from_pretrained(weights_dir).eval()
        return model.bert, model.linear.weight.detach()
    encoder = BertModel.from_pretrained(weights_dir).eval()
    return encoder, load_file(str(weights_dir / "1_Dense" / "model.safetensors"))["linear.weight"]


def colbert(layout: str, weights_dir: Path, texts: list[str], is_query: bool) -> list[np.ndarray]:
    """Per text [rows, dim], as PyLate's `ColBERT.encode` (and colbert-ir) computes it: tokenise with one slot left,
    insert the marker id after [CLS], encode, project, normalise. A query is padded to its cap with [MASK] (the pad
    token becomes [MASK]; the attention mask stays 0 there) and keeps every row; a document keeps the rows of its
    real tokens minus the punctuation skiplist (symbols the vocabulary lacks left out, see `skiplist_ids`)."""
    q_marker, d_marker, q_cap, d_cap = COLBERT_LAYOUTS[layout]
    tokenizer = AutoTokenizer.from_pretrained(weights_dir)
    marker = tokenizer.convert_tokens_to_ids(q_marker if is_query else d_marker)
    assert marker != tokenizer.unk_token_id
    if is_query:
        tokenizer.pad_token = tokenizer.mask_token
    encoded = tokenizer(texts, padding="max_length" if is_query else True, truncation=True,
                        max_length=(q_cap if is_query else d_cap) - 1, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    ids = torch.cat([ids[:, :1], torch.full_like(ids[:, :1], marker), ids[:, 1:]], dim=1)
    mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]), mask[:, 1:]], dim=1)
    encoder, weight = _colbert_weights(layout, weights_dir)
    with torch.inference_mode():
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        vectors = F.normalize(hidden @ weight.T, p=2, dim=-1)
    if is_query:
        return [vectors[i].numpy() for i in range(len(texts))]
    punctuation = [tokenizer.convert_tokens_to_ids(symbol) for symbol in string.punctuation]
    skip = torch.tensor([i for i in punctuation if i != tokenizer.unk_token_id])
    keep = mask.bool() & ~torch.isin(ids, skip)
    return [vectors[i][keep[i]].numpy() for i in range(len(texts))]


def _linear(path: Path) -> torch.nn.Linear:
    state = torch.load(path, map_location="cpu", weights_only=True)
    layer = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    layer.load_state_dict(state)
    return layer.eval()


def bge_m3(weights_dir: Path, texts: list[str]) -> tuple[np.ndarray, list[dict[int, float]], list[np.ndarray]]:
    """(dense, sparse as {token id: weight}, colbert rows) as FlagEmbedding's `BGEM3FlagModel.encode` computes them."""
    tokenizer = AutoTokenizer.from_pretrained(weights_dir)
    model = AutoModel.from_pretrained(weights_dir).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=126, return_tensors="pt")
    mask = encoded["attention_mask"]
    with torch.inference_mode():
        hidden = model(**encoded).last_hidden_state
        dense = F.normalize(hidden[:, 0], dim=-1)
        token_weights = torch.relu(_linear(weights_dir / "sparse_linear.pt")(hidden))
        vectors = _linear(weights_dir / "colbert_linear.pt")(hidden[:, 1:]) * mask[:, 1:][:, :, None].float()
        vectors = F.normalize(vectors, dim=-1)
    unused = {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    lexical: list[dict[int, float]] = []
    for weights, ids in zip(token_weights.squeeze(-1).tolist(), encoded["input_ids"].tolist(), strict=True):
        found: dict[int, float] = {}
        for w, idx in zip(weights, ids, strict=True):
            if idx not in unused and w > 0 and w > found.get(idx, 0.0):
                found[idx] = w
        lexical.append(found)
    tokens = mask.sum(dim=1).tolist()
    return dense.numpy(), lexical, [vectors[i, :tokens[i] - 1].numpy() for i in range(len(texts))]


def lexical_rows(lexical: list[dict[int, float]], vocab: int) -> np.ndarray:
    """{token id: weight} per item as a dense [items, vocab] float32 matrix."""
    out = np.zeros((len(lexical), vocab), dtype=np.float32)
    for row, found in zip(out, lexical, strict=True):
        row[list(found)] = list(found.values())
    return out
