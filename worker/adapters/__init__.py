"""Adapter families, one module each; `build_adapter` picks one by the name in the model config."""

from __future__ import annotations

import importlib

from sie_worker.adapters.base import Adapter
from sie_worker.protocol import WorkerSpec

# Family name -> "module:Class". Modules import torch lazily through this table, so a family's heavy imports
# (gliner, PIL) are paid only by the workers that serve it.
FAMILIES: dict[str, str] = {
    "dense": "sie_worker.adapters.dense:DenseAdapter",
    "fake": "sie_worker.adapters.fake:FakeAdapter",
}


def build_adapter(spec: WorkerSpec) -> Adapter:
    try:
        target = FAMILIES[spec.adapter]
    except KeyError:
        raise ValueError(f"unknown adapter family {spec.adapter!r}; known: {sorted(FAMILIES)}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    adapter: Adapter = cls(spec)
    return adapter
