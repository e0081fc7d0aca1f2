"""Export a BERT-style encoder folder to model.onnx (runs inside the Infinity venv, which has torch and transformers).

Usage: python export_onnx.py MODEL_DIR OUT.onnx [--sequence-classification]. Inputs input_ids, attention_mask,
token_type_ids; dynamic batch/seq. With --sequence-classification the graph is the cross-encoder's, returning `logits`
(what optimum's ORTModelForSequenceClassification, under Infinity's ONNX rerank engine, reads).
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer


def main(model_dir: str, out: str, sequence_classification: bool = False) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    loader = AutoModelForSequenceClassification if sequence_classification else AutoModel
    model = loader.from_pretrained(model_dir).eval()
    output = "logits" if sequence_classification else "last_hidden_state"
    enc = tokenizer(["a short sentence", "another, somewhat longer sentence for the export"], padding=True,
                    return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes[output] = {0: "batch"} if sequence_classification else {0: "batch", 1: "sequence"}
    with torch.inference_mode():
        torch.onnx.export(model, (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), out,
                          input_names=names, output_names=[output], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--sequence-classification" in sys.argv[3:])
