"""Inferring a model's adapter family from the files of its folder, as Infinity does (router process).

Used for `-m` models that are not in the bundle. The most specific evidence wins: files only one family carries
(GLiNER's config, BGE-M3's heads, colbert-ir's metadata, a PyLate or SPLADE module) are checked before architectures,
and dense comes last, so a checkpoint carrying another family's files is never served as dense. Files that fit no
family, or fit one only partly, fail the load with what was found and how to name the adapter instead. The options
each adapter needs (pooling, markers, query length) it reads from the same files itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from sie_router.models.config import ADAPTER_PATH_FAMILIES, ModelConfig, Profile
from sie_router.models.weights import WeightsQuery, resolve_weights
from sie_worker.st_layout import Layout, read_json, read_layout
from sie_worker.st_pipeline import Dense, Pipeline, Unsupported, read_pipeline

log = logging.getLogger("sie.inference")

FAMILIES = ("dense", "sparse", "multivector", "hybrid", "cross_encoder", "classifier", "ner", "gliner", "clip")
SPARSE_MODULES = ("MLMTransformer", "SpladePooling")
HOW_TO_NAME = ("name the adapter with `--adapter FAMILY` after this `-m`, or in a bundle YAML (`profiles: {default: "
               "{adapter: FAMILY}}`); families: " + ", ".join(FAMILIES))


class CannotInfer(ValueError):
    """The files fit no family, or fit one only partly."""


class Inferred(NamedTuple):
    family: str
    tasks: dict[str, Any]
    inputs: dict[str, bool]
    reason: str


def tasks_of(family: str, folder: Path) -> tuple[dict[str, Any], dict[str, bool]]:
    """(tasks, inputs) a family offers for the checkpoint in `folder`; widths are filled in where the files say."""
    config = read_json(folder / "config.json") or {}
    # The encoder's width under its config's name for it (T5: d_model; DistilBERT: dim).
    hidden = config.get("hidden_size") or config.get("d_model") or config.get("dim")
    vocab = config.get("vocab_size")
    if family == "dense":
        return {"encode": {"dense": {"dim": _dense_dim(folder, hidden)}}}, {}
    if family == "sparse":
        return {"encode": {"sparse": {"dim": vocab}}}, {}
    if family == "multivector":
        dense = read_layout(folder).module("Dense")
        width = (dense.config.get("out_features") if dense
                 else (read_json(folder / "artifact.metadata") or {}).get("dim"))
        return {"encode": {"multivector": {"dim": width}}}, {}
    if family == "hybrid":
        return {"encode": {"dense": {"dim": hidden}, "sparse": {"dim": vocab}, "multivector": {}}}, {}
    if family == "cross_encoder":
        return {"score": {}}, {}
    if family == "clip":
        return {"encode": {"dense": {"dim": config.get("projection_dim") or 512}}}, {"text": True, "image": True}
    return {"extract": {}}, {}


def infer_family(folder: Path) -> Inferred:
    """The family of the checkpoint in `folder`, and why; `CannotInfer` when the files do not say."""
    family, reason = _family(folder)
    tasks, inputs = tasks_of(family, folder)
    return Inferred(family, tasks, inputs, reason)


def _family(folder: Path) -> tuple[str, str]:
    config = read_json(folder / "config.json")
    architectures = [str(a) for a in (config or {}).get("architectures") or []]
    layout = read_layout(folder)
    if (folder / "gliner_config.json").is_file():
        return "gliner", "gliner_config.json"
    heads = [name for name in ("colbert_linear.pt", "sparse_linear.pt") if (folder / name).is_file()]
    if len(heads) == 2:
        return "hybrid", "BGE-M3 heads colbert_linear.pt and sparse_linear.pt"
    if heads:
        raise CannotInfer(f"found {heads[0]} without its BGE-M3 partner; a BGE-M3 checkpoint has both "
                          "colbert_linear.pt and sparse_linear.pt")
    if config is None:
        raise CannotInfer("found no config.json")
    if any(a.startswith("CLIP") for a in architectures) or config.get("model_type") == "clip":
        return "clip", f"CLIP architecture {architectures or config.get('model_type')}"
    if (folder / "artifact.metadata").is_file() or "HF_ColBERT" in architectures:
        return "multivector", "colbert-ir layout (artifact.metadata / HF_ColBERT)"
    if any("pylate" in m.type for m in layout.modules):
        return "multivector", "PyLate ColBERT modules in modules.json"
    if layout.module(*SPARSE_MODULES):
        # An inference-free SPLADE's Router and static embeddings, say, are not the MLM formula.
        if unknown := _other_modules(layout, SPARSE_MODULES):
            raise CannotInfer(f"found sentence-transformers sparse modules the sparse adapter does not run: {unknown}")
        return "sparse", "sentence-transformers SparseEncoder modules (SpladePooling) in modules.json"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        labels = [str(v).lower() for v in (config.get("id2label") or {}).values()]
        if any(label.startswith("entail") for label in labels):
            return "classifier", "sequence classifier with an entailment label (NLI zero-shot)"
        if (len(labels) or int(config.get("num_labels") or 2)) == 1:
            return "cross_encoder", "sequence classifier with one label (cross-encoder)"
        return "classifier", f"sequence classifier with labels {labels}"
    if any(a.endswith("ForTokenClassification") for a in architectures):
        return "ner", "token classifier"
    if any(a.endswith("ForMaskedLM") for a in architectures) and not layout.modules:
        return "sparse", f"masked-LM head {architectures} without sentence-transformers modules (SPLADE)"
    if layout.modules:
        try:
            pipeline = read_pipeline(layout)
        except Unsupported as exc:
            raise CannotInfer(f"found sentence-transformers modules the dense engines do not compute: {exc}") from None
        return "dense", f"sentence-transformers modules in modules.json: {describe(pipeline)}"
    if architectures and all(a.endswith("Model") and not a.endswith("PreTrainedModel") for a in architectures):
        return "dense", f"bare encoder {architectures} with no pooling config: mean pooling, as Infinity does"
    raise CannotInfer(f"found config.json with architectures {architectures or 'none'} and no file that names a "
                      "family")


def describe(pipeline: Pipeline) -> str:
    """The steps as a line of the log, e.g. `Transformer, Pooling (max), Dense (768 -> 512, Tanh), Normalize`."""
    pooling = pipeline.pooling
    steps = [f"Pooling ({'+'.join(pooling.modes)}{'' if pooling.include_prompt else ', prompt excluded'})"]
    for step in pipeline.steps:
        steps.append(f"Dense ({step.in_features} -> {step.out_features}, {step.activation})"
                     if isinstance(step, Dense) else "Normalize")
    return ", ".join(["Transformer", *steps])


def _dense_dim(folder: Path, hidden: int | None) -> int | None:
    """The width of the sentence embedding: the last Dense module's, else the pooled width (the worker refuses a
    checkpoint whose steps it cannot compute, and says why)."""
    try:
        pipeline = read_pipeline(read_layout(folder))
    except Unsupported:
        return hidden
    width = pipeline.pooling.width or hidden
    has_dense = any(isinstance(step, Dense) for step in pipeline.steps)
    return pipeline.dim(int(width or 0)) if width or has_dense else None


def _other_modules(layout: Layout, kinds: tuple[str, ...]) -> list[str]:
    """The module types (as written) of the modules not of these kinds."""
    return [m.type for m in layout.modules if m.kind not in kinds]


def infer_config(model: str, *, offline: bool, adapter: str | None = None) -> ModelConfig:
    """A config for a folder or hub id outside the bundle, found offline first; `adapter` overrides the inference."""

    folder, origin = resolve_weights(WeightsQuery(model_id=model), offline=offline)
    if adapter:
        family = ADAPTER_PATH_FAMILIES.get(adapter, adapter)
        if family not in FAMILIES:
            raise CannotInfer(f"model {model!r}: unknown adapter {adapter!r}; {HOW_TO_NAME}")
        tasks, inputs = tasks_of(family, folder)
        found = Inferred(family, tasks, inputs, f"--adapter {adapter}")
    else:
        try:
            found = infer_family(folder)
        except CannotInfer as exc:
            raise CannotInfer(f"model {model!r} ({folder}): cannot tell its family: {exc}; {HOW_TO_NAME}") from None
    log.info("%s: %s adapter, because of %s (weights from %s, %s)", model, found.family, found.reason, folder, origin)
    max_len = read_layout(folder).max_seq_length
    return ModelConfig(sie_id=model, weights_path=str(folder), tasks=found.tasks, inputs=found.inputs,
                       max_sequence_length=max_len if found.family == "dense" else None,
                       profiles={"default": Profile(adapter=found.family)},
                       source=f"inferred from {folder} ({origin}): {found.reason}")
