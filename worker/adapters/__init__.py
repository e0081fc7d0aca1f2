"""Adapter families, one module each; `build_adapter` picks one by the name in the model config."""

from __future__ import annotations

import importlib

from sie_worker.adapters.base import Adapter, UnknownFamily
from sie_worker.protocol import WorkerSpec

# Family name -> "module:Class". Modules import torch lazily through this table, so a family's heavy imports
# (gliner, PIL) are paid only by the workers that serve it.
FAMILIES: dict[str, str] = {
    "dense": "sie_worker.adapters.dense:DenseAdapter",
    "sparse": "sie_worker.adapters.sparse:SparseAdapter",
    "multivector": "sie_worker.adapters.multivector:MultivectorAdapter",
    "hybrid": "sie_worker.adapters.hybrid:HybridAdapter",
    "cross_encoder": "sie_worker.adapters.cross_encoder:CrossEncoderAdapter",
    "fake": "sie_worker.adapters.fake:FakeAdapter",
    "classifier": "sie_worker.adapters.classifier:ClassifierAdapter",
    "ner": "sie_worker.adapters.ner:NerAdapter",
    "gliner": "sie_worker.adapters.gliner_adapter:GlinerAdapter",
    "clip": "sie_worker.adapters.clip:ClipAdapter",
}


def build_adapter(spec: WorkerSpec) -> Adapter:
    """The adapter for the spec's family, not loaded yet. A dense encoder on CPU is served without torch from an
    exported graph where it can be (`dense_lean.build` exports it first, in a helper process); torch otherwise."""
    if spec.adapter == "dense":
        from sie_worker.adapters import dense_lean

        lean = dense_lean.build(spec)
        if lean is not None:
            return lean
    try:
        target = FAMILIES[spec.adapter]
    except KeyError:
        raise UnknownFamily(f"unknown adapter family {spec.adapter!r}; known: {sorted(FAMILIES)}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    adapter: Adapter = cls(spec)
    return adapter
