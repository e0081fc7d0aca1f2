"""The packed export of a BERT-shaped encoder (export helper process, with torch): the same weights and arithmetic
as transformers' forward, with the linear layers, layer norms and residuals over a call's real tokens only, laid end
to end `[N, H]`; only attention sees padded rows `[B, L]` (adapters.packed_feed holds the layout and why).

Packed here: BertModel, RobertaModel and XLMRobertaModel (MiniLM, BGE, E5, GTE, BGE-M3 and their kin), whose layers
are transformers' post-norm blocks with absolute positions, for their last hidden state; and their sequence and token
classification heads (cross-encoders such as ms-marco-MiniLM and bge-reranker, NER taggers) over it. Any other
encoder or head is exported padded. The export helper checks a packed graph against transformers' own forward on the
probe batches, as it checks every graph, and exports padded instead where it disagrees.
"""

from __future__ import annotations

import torch

# The classification heads over the last hidden state [B, L, H], as transformers' forward applies them (dropout is the
# identity in eval): BERT's pools the [CLS] row through its pooler; RoBERTa's sequence head reads the [CLS] row itself.
CLASSIFIERS = {
    "BertForSequenceClassification": lambda model, hidden: model.classifier(model.bert.pooler(hidden)),
    "RobertaForSequenceClassification": lambda model, hidden: model.classifier(hidden),
    "XLMRobertaForSequenceClassification": lambda model, hidden: model.classifier(hidden),
    "BertForTokenClassification": lambda model, hidden: model.classifier(hidden),
    "RobertaForTokenClassification": lambda model, hidden: model.classifier(hidden),
    "XLMRobertaForTokenClassification": lambda model, hidden: model.classifier(hidden),
}
# transformers' classes whose modules this forward reproduces, with where their position ids start: RoBERTa's count
# from its padding index + 1 (create_position_ids_from_input_ids, for rows padded on the right), BERT's from 0.
PACKABLE = ("BertModel", "RobertaModel", "XLMRobertaModel")


def position_offset(model: torch.nn.Module) -> int:
    embeddings = model.embeddings  # type: ignore[union-attr]
    return int(embeddings.padding_idx) + 1 if type(model).__name__ != "BertModel" else 0


def unpackable(model: torch.nn.Module) -> str | None:
    """Why the packed forward cannot stand for `model`'s, or None when it can."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name not in PACKABLE or config is None:
        return f"{name} is not one of {', '.join(PACKABLE)}"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "a decoder or cross-attention configuration"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return "relative position embeddings"
    if config.hidden_size % config.num_attention_heads:
        return "a hidden size that is not a multiple of the heads"
    return None


class PackedEncoder(torch.nn.Module):
    """`model`'s last hidden state [B, L, H] (zeros at padding) from a call in adapters.packed_feed's layout."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        reason = unpackable(model)
        if reason is not None:
            raise ValueError(f"cannot pack this encoder: {reason}")
        self.model = model
        config = model.config  # type: ignore[union-attr]
        self.heads = int(config.num_attention_heads)
        self.head_size = int(config.hidden_size) // self.heads
        self.offset = position_offset(model)
        # Q, K and V as one product per layer: one larger GEMM and one gather into padded rows instead of three.
        self.qkv = [(torch.cat([a.query.weight, a.key.weight, a.value.weight]).detach(),
                     torch.cat([a.query.bias, a.key.bias, a.value.bias]).detach())
                    for a in (layer.attention.self for layer in model.encoder.layer)]  # type: ignore[union-attr]

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor,
                gather_index: torch.Tensor, unpad_index: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.embeddings  # type: ignore[union-attr]
        hidden = embeddings.word_embeddings(input_ids) + embeddings.token_type_embeddings(token_type_ids)
        hidden = embeddings.LayerNorm(hidden + embeddings.position_embeddings(position_ids + self.offset))
        rows, length = gather_index.shape
        keys = attention_mask.to(torch.bool)[:, None, None, :]  # which keys each query attends to
        for layer, qkv in zip(self.model.encoder.layer, self.qkv, strict=True):  # type: ignore[union-attr]
            hidden = self.block(layer, qkv, hidden, gather_index, unpad_index, keys, rows, length)
        return self.padded(hidden, gather_index)

    def block(self, layer: torch.nn.Module, qkv: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor,
              gather_index: torch.Tensor, unpad_index: torch.Tensor, keys: torch.Tensor, rows: int,
              length: int) -> torch.Tensor:
        attention = layer.attention
        projected = self.padded(torch.nn.functional.linear(hidden, *qkv), gather_index)  # [B, L, 3 x H]
        q, k, v = projected.view(rows, length, 3, self.heads, self.head_size).permute(2, 0, 3, 1, 4)
        # Traced as transformers' own SDPA attention is. The ONNX file (float32 engines) spells it in opset 17's ops;
        # the bf16 engine's OpenVINO file keeps it as one ScaledDotProductAttention op, a fused kernel
        # (export_graph.save_openvino_ir). In bf16 a text's vector then moves with its row's padded length by a
        # cosine of 1e-5 at most (bench/README.md, "Attention as one OpenVINO op").
        context = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys,
                                                                   scale=attention.self.scaling)  # [B, heads, L, d]
        context = context.permute(0, 2, 1, 3).reshape(rows * length, self.heads * self.head_size)[unpad_index]
        hidden = attention.output.LayerNorm(attention.output.dense(context) + hidden)
        inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
        return layer.output.LayerNorm(layer.output.dense(inner) + hidden)

    @staticmethod
    def padded(flat: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
        """[N, D] tokens into padded rows [B, L, D], zeros at padding (gather_index names row N, appended here)."""
        return torch.cat([flat, flat.new_zeros(1, flat.shape[1])])[gather_index]


class PackedClassifier(torch.nn.Module):
    """A sequence or token classification model's float32 logits ([B, labels] or [B, L, labels]) from a packed call:
    its encoder packed (PackedEncoder), its head over the padded hidden state as transformers applies it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.encoder = PackedEncoder(model.base_model)  # type: ignore[arg-type]
        self.head = CLASSIFIERS[type(model).__name__]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.model, self.encoder(*inputs))
        return logits.float()


def classifier_unpackable(model: torch.nn.Module) -> str | None:
    """Why a classification model cannot be exported packed, or None when it can."""
    if type(model).__name__ not in CLASSIFIERS:
        return f"{type(model).__name__} is not one of {', '.join(CLASSIFIERS)}"
    return unpackable(model.base_model)  # type: ignore[arg-type]
