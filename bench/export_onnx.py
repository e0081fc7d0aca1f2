"""Export a BERT-style encoder folder to model.onnx (runs inside the Infinity venv, which has torch and transformers).

Usage: python export_onnx.py MODEL_DIR OUT.onnx. Inputs input_ids, attention_mask, token_type_ids; dynamic batch/seq.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModel, AutoTokenizer


def main(model_dir: str, out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    enc = tokenizer(["a short sentence", "another, somewhat longer sentence for the export"], padding=True,
                    return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    with torch.inference_mode():
        torch.onnx.export(model, (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), out,
                          input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
