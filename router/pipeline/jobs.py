"""The typed request pipeline's values (router process): a resolved model, batch keys, jobs and their outputs.

Every API decodes its request into one frozen job (`EncodeJob`, `ScoreJob`, `ExtractJob`, `TokenizeJob`) naming a
`Resolved` model, looked up once; `Service.run` queues it under its hashable `BatchKey` and returns the outputs of
its items as array slices (`Encoded`, `Scored`), never row by row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from sie_router.models.config import ModelConfig
from sie_worker.protocol import EncodeResult, InputItem, ScoreResult

Frozen = tuple[tuple[str, Any], ...]  # a `FrozenDict` of options


class Resolved(msgspec.Struct, frozen=True):
    """A served name resolved once per request: its config, its profile and the name the client used."""

    name: str
    config: ModelConfig
    profile: str = "default"

    @property
    def key(self) -> str:
        """The pool's key for the model (profiles share one worker)."""
        return self.config.sie_id

    @property
    def runtime(self) -> dict[str, Any]:
        """The profile's runtime options."""
        return self.config.profiles[self.profile].adapter_options.runtime

    @property
    def family(self) -> str:
        return self.config.family(self.profile)


class FrozenDict(tuple):  # type: ignore[type-arg]
    """A dict frozen into sorted (key, value) pairs, so `thaw` can tell it from a list."""

    __slots__ = ()


def freeze(value: Any) -> Any:
    """A hashable copy of an options value: dicts become `FrozenDict`s, lists tuples."""
    if isinstance(value, dict):
        return FrozenDict(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The inverse of `freeze`: the options dict the worker receives."""
    if isinstance(value, FrozenDict):
        return {k: thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


class BatchKey(msgspec.Struct, frozen=True):
    """What items must share to ride in one batch: the operation and everything the worker applies batch-wide."""

    op: str
    output_types: tuple[str, ...] = ()
    is_query: bool = False
    labels: tuple[str, ...] = ()
    options: Frozen = FrozenDict()  # freeze(options), hashable


class ItemsJob(msgspec.Struct, frozen=True):
    """Base of the jobs over input items; `wait_s` bounds the wait for a loading model (None: the pool's default)."""

    model: Resolved
    items: Sequence[InputItem]
    key: BatchKey
    wait_s: float | None = None


class EncodeJob(ItemsJob, frozen=True):
    """Encode these (already templated) items."""


class ScoreJob(msgspec.Struct, frozen=True):
    """Score each document against the query."""

    model: Resolved
    query: str
    documents: Sequence[str]
    key: BatchKey
    wait_s: float | None = None


class ExtractJob(ItemsJob, frozen=True):
    """Extract from each item, against the key's labels."""


class TokenizeJob(msgspec.Struct, frozen=True):
    """Tokenize texts (`op` "tokenize") or decode id lists (`op` "decode") with the model's own tokenizer."""

    model: Resolved
    texts: Sequence[str] = ()
    ids: Sequence[Sequence[int]] = ()
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    wait_s: float | None = None


Job = EncodeJob | ScoreJob | ExtractJob | TokenizeJob


class Ragged(msgspec.Struct, frozen=True):
    """Rows of varying length packed CSR-style: item i owns `values[offsets[i]:offsets[i + 1]]`."""

    values: tuple[np.ndarray, ...]  # one or more arrays sharing the offsets (sparse: indices and values)
    offsets: np.ndarray

    def row(self, i: int) -> tuple[np.ndarray, ...]:
        start, stop = self.offsets[i], self.offsets[i + 1]
        return tuple(v[start:stop] for v in self.values)

    def slice(self, start: int, stop: int) -> Ragged:
        """Rows start..stop as views, offsets rebased to 0."""
        offsets = self.offsets[start:stop + 1]
        return Ragged(tuple(v[offsets[0]:offsets[-1]] for v in self.values), offsets - offsets[0])

    def take(self, positions: np.ndarray) -> Ragged:
        rows = [self.row(int(i)) for i in positions]
        lengths = np.array([len(r[0]) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = tuple(np.concatenate([r[k] for r in rows]) if rows else v[:0] for k, v in enumerate(self.values))
        return Ragged(values, offsets)


class Encoded(msgspec.Struct, frozen=True):
    """Encode outputs of consecutive items, float32: dense rows, sparse and multivector as `Ragged`, token counts."""

    tokens: np.ndarray
    dense: np.ndarray | None = None
    sparse: Ragged | None = None
    multivector: Ragged | None = None

    @classmethod
    def from_result(cls, result: EncodeResult) -> Encoded:
        sparse = multivector = None
        if result.sparse_indices is not None and result.sparse_values is not None and result.sparse_offsets:
            sparse = Ragged((result.sparse_indices.numpy(), result.sparse_values.numpy()),
                            np.asarray(result.sparse_offsets, dtype=np.int64))
        if result.multivector is not None and result.multivector_offsets:
            multivector = Ragged((result.multivector.numpy(),), np.asarray(result.multivector_offsets, np.int64))
        return cls(np.asarray(result.token_counts, dtype=np.int64),
                   result.dense.numpy() if result.dense is not None else None, sparse, multivector)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, part: slice) -> Encoded:
        start, stop, _ = part.indices(len(self))
        return Encoded(self.tokens[start:stop], None if self.dense is None else self.dense[start:stop],
                       None if self.sparse is None else self.sparse.slice(start, stop),
                       None if self.multivector is None else self.multivector.slice(start, stop))

    def take(self, positions: np.ndarray) -> Encoded:
        return Encoded(self.tokens[positions], None if self.dense is None else self.dense[positions],
                       None if self.sparse is None else self.sparse.take(positions),
                       None if self.multivector is None else self.multivector.take(positions))

    @classmethod
    def join(cls, parts: list[Encoded], order: list[int]) -> Encoded:
        """Parts (entries in queue order) back into request order: `order[k]` is where the k-th output goes."""
        whole = parts[0] if len(parts) == 1 else cls(
            np.concatenate([p.tokens for p in parts]),
            None if parts[0].dense is None else np.concatenate([p.dense for p in parts if p.dense is not None]),
            _concat([p.sparse for p in parts]), _concat([p.multivector for p in parts]))
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
        return whole if np.array_equal(inverse, np.arange(len(order))) else whole.take(inverse)


def _concat(parts: list[Ragged | None]) -> Ragged | None:
    if parts[0] is None:
        return None
    present = [p for p in parts if p is not None]
    offsets, base = [np.zeros(1, np.int64)], 0
    for p in present:
        offsets.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])
    values = tuple(np.concatenate([p.values[k] for p in present]) for k in range(len(present[0].values)))
    return Ragged(values, np.concatenate(offsets))


class Scored(msgspec.Struct, frozen=True):
    """Scores of consecutive pairs: activated score, raw logit, token count."""

    scores: np.ndarray
    raw: np.ndarray
    tokens: np.ndarray

    @classmethod
    def from_result(cls, result: ScoreResult) -> Scored:
        return cls(result.scores.numpy().astype(np.float64), result.raw.numpy().astype(np.float64),
                   np.asarray(result.token_counts, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, part: slice) -> Scored:
        return Scored(self.scores[part], self.raw[part], self.tokens[part])

    @classmethod
    def join(cls, parts: list[Scored], order: list[int]) -> Scored:
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
        scores, raw, tokens = (np.concatenate([getattr(p, f) for p in parts])[inverse]
                               for f in ("scores", "raw", "tokens"))
        return cls(scores, raw, tokens)
