"""Adapter families, one module each; `build_adapter` picks one by the name in the model config."""

from __future__ import annotations

import importlib
from pathlib import Path

from sie_worker.adapters.base import Adapter, BadModelConfig, UnknownFamily
from sie_worker.options import LEAN_FAMILIES
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

# Families a lean worker serves on the CPU without torch where it can: family -> "module:build", whose `build(spec)`
# returns the lean adapter or None for torch (lean_engine says when).
LEAN: dict[str, str] = {
    "dense": "sie_worker.adapters.dense_lean:build",
    "cross_encoder": "sie_worker.adapters.lean_cross_encoder:build",
    "sparse": "sie_worker.adapters.lean_sparse:build",
    "multivector": "sie_worker.adapters.lean_multivector:build",
    "classifier": "sie_worker.adapters.lean_classifier:build",
    "ner": "sie_worker.adapters.lean_ner:build",
    "hybrid": "sie_worker.adapters.lean_hybrid:build",
    "clip": "sie_worker.adapters.lean_clip:build",
}
# Placement estimates a worker by LEAN_FAMILIES (the router cannot import this module's table): both name the same.
if set(LEAN) != LEAN_FAMILIES:
    raise ImportError(f"adapters.LEAN {sorted(LEAN)} and options.LEAN_FAMILIES {sorted(LEAN_FAMILIES)} differ")


def refuse_custom_code(spec: WorkerSpec) -> None:
    """A checkpoint whose config names its own code (`auto_map`) loads only where the server trusts remote code, and
    only as a dense encoder: transformers would otherwise load the stock class of its model type, silently wrong."""
    if spec.adapter == "fake" or not spec.weights_dir:
        return
    from sie_worker.st_layout import read_layout
    from sie_worker.st_pipeline import custom_code

    names = custom_code(read_layout(Path(spec.weights_dir)).encoder_folder)
    if names is None:
        return
    if spec.adapter != "dense":
        raise BadModelConfig(f"model {spec.model!r} runs custom code ({names}); SIE runs a checkpoint's own code only "
                             "for dense encoders, with --trust-remote-code")
    if not spec.trust_remote_code:
        raise BadModelConfig(f"model {spec.model!r} runs custom code ({names}); start the server with "
                             "--trust-remote-code (SIE_TRUST_REMOTE_CODE=true) to run it, on torch")


def build_adapter(spec: WorkerSpec) -> Adapter:
    """The adapter for the spec's family, not loaded yet. A family in LEAN is served on the CPU without torch from an
    exported graph where it can be (its `build` exports it first, in a helper process); torch otherwise."""
    refuse_custom_code(spec)
    if spec.adapter in LEAN:  # the router's placement estimates these workers as lean (LEAN_FAMILIES)
        from sie_worker.adapters.lean_engine import runtimes_for

        module_name, function = LEAN[spec.adapter].split(":")
        lean = getattr(importlib.import_module(module_name), function)(spec) if runtimes_for(spec) else None
        if lean is not None:
            return lean  # type: ignore[no-any-return]
    try:
        target = FAMILIES[spec.adapter]
    except KeyError:
        raise UnknownFamily(f"unknown adapter family {spec.adapter!r}; known: {sorted(FAMILIES)}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    adapter: Adapter = cls(spec)
    return adapter
