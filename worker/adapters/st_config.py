"""The settings every dense engine resolves (worker process, free of torch): pooling, normalisation and maximum
length, from the model config's options over what the checkpoint's sentence-transformers files declare
(`sie_worker.st_layout`) over the defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sie_worker.adapters.base import BadModelConfig
from sie_worker.protocol import DenseOptions, WorkerSpec
from sie_worker.st_layout import read_layout

# sentence-transformers' pooling modes that the dense engines compute, under our names.
POOLINGS = {"cls": "cls", "mean": "mean", "lasttoken": "last"}


@dataclass(frozen=True)
class DenseSettings:
    """A dense encoder's pooling, normalisation and maximum length (None: the tokenizer's, capped at 512)."""

    max_length: int | None
    pooling: str
    normalize: bool


def checkpoint_pooling(modes: tuple[str, ...] | None) -> str | None:
    """Our name for the checkpoint's pooling (None without a Pooling module). A mode the engines do not compute
    (max, weightedmean, a concatenation of several) is refused: mean pooling in its place would give plausible,
    wrong vectors."""
    if modes is None:
        return None
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise BadModelConfig(f"the checkpoint pools with {'+'.join(modes)}; the dense engines compute "
                             f"{', '.join(POOLINGS)} (set `pooling` in the model config to override)")
    return POOLINGS[modes[0]]


def dense_settings(spec: WorkerSpec) -> DenseSettings:
    """The model config's options over the checkpoint's sentence-transformers files over the defaults (mean pooling,
    no normalisation), as every dense engine resolves them."""
    layout = read_layout(Path(spec.weights_dir))
    options = spec.options_as(DenseOptions)
    return DenseSettings(max_length=spec.max_sequence_length or layout.max_seq_length,
                         pooling=options.pooling or checkpoint_pooling(layout.pooling) or "mean",
                         normalize=layout.normalize if options.normalize is None else options.normalize)
