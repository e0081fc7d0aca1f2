"""The adapter contract every model family implements (worker process).

A batch goes through two calls so that tokenising batch n+1 overlaps the forward pass of batch n:
`prepare` runs on the worker's prepare thread (CPU work, no device), `forward` on the main thread (the model).
Memory contract: after `close()` the adapter holds no device memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sie_worker.protocol import EncodeBatch, ExtractBatch, Result, RunEngine, ScoreBatch, WorkerSpec

Batch = EncodeBatch | ScoreBatch | ExtractBatch


class UnsupportedTask(Exception):
    """The model cannot do what the batch asks (the router checks first; this is the worker's guard)."""


class OutOfMemory(Exception):
    """The device ran out of memory for this batch (for adapters whose engine has no typed OOM of its own)."""


class BadModelConfig(Exception):
    """The model's config cannot work (a permanent load failure: retrying will not help)."""


class UnknownFamily(BadModelConfig):
    """The config names an adapter family this worker does not have."""


class BadInput(Exception):
    """An input the model cannot take (an undecodable image, an out-of-range option): the batch fails with 400."""


class InputTooLong(BadInput):
    """A text longer than the model's maximum sequence length when the request asked not to truncate (400)."""


def refuse_over_length(token_counts: list[int], max_length: int | None) -> None:
    """For `truncates()` false: fail the batch, stating the token count, if any text is over `max_length` tokens."""
    longest = max(token_counts, default=0)
    if max_length is not None and longest > max_length:
        raise InputTooLong(f"input is {longest} tokens long, over this model's maximum of {max_length}; shorten it "
                           "or let it be cut (`truncate` on, `overflow_policy` not `error`)")


OVERFLOW_POLICIES = ("default", "truncate_text", "error")


def truncates(options: dict[str, Any]) -> bool:
    """Whether a text over the model's maximum is cut there (the default) or refused: `truncate: false` (encode and
    score), or `overflow_policy: error` (score and extract, sie-native section 8; `default` and `truncate_text` cut).
    Any other policy is BadInput."""
    policy = options.get("overflow_policy") or "default"
    if policy not in OVERFLOW_POLICIES:
        raise BadInput(f"overflow_policy must be one of {', '.join(OVERFLOW_POLICIES)}, not {policy!r}")
    return options.get("truncate", True) is not False and policy != "error"


def refuse_overflow(batch: ExtractBatch, untruncated_counts: Callable[[], list[int]], max_length: int | None) -> None:
    """For the extract families, which cut by default: fail the batch if `truncates()` is false and a text is over
    the maximum, counted untruncated by `untruncated_counts()` (called only then)."""
    if not truncates(batch.options):
        refuse_over_length(untruncated_counts(), max_length)


@dataclass
class LoadInfo:
    """What `load` found out about the model; the worker's `Ready` reports it."""

    dims: dict[str, int]
    capabilities: list[str]
    max_sequence_length: int | None = None
    engine: RunEngine = "torch"  # what runs the model; the lean dense adapter's graph runtimes say otherwise
    precision: str | None = None  # what the forward computes in, where the adapter knows better than the spec


def torch_precision(spec: WorkerSpec) -> str:
    """What a torch adapter computes in (torch_common.compute_dtype, without importing torch): the spec's precision
    (resolved on a GPU at start-up), float32 on the CPU unless bfloat16 is asked for."""
    precision = spec.compute_precision or "float32"
    return "float32" if precision == "float16" and not spec.device.startswith("cuda") else precision


@dataclass
class Prepared:
    """A batch after `prepare`: whatever the family's forward needs, plus accounting."""

    batch: Batch
    inputs: Any = None
    token_counts: list[int] = field(default_factory=list)
    tokenize_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class StartsEarly(Protocol):
    """An adapter that can begin a prepared batch's forward calls before its turn (queued behind the running
    batch's), on the worker's prepare thread; its `forward` then waits for them."""

    def start(self, prepared: Prepared) -> None: ...


class Adapter(Protocol):
    def load(self) -> LoadInfo: ...

    def prepare(self, batch: Batch) -> Prepared: ...

    def forward(self, prepared: Prepared) -> Result: ...

    def memory_bytes(self) -> int: ...

    def close(self) -> None: ...
