"""Every message that crosses ZeroMQ between the router and a worker. Imported by both processes.

Router to worker: imperatives (`EncodeBatch`, `ScoreBatch`, `ExtractBatch`, `TokenizeBatch`, `DecodeBatch`,
`Ping`, `Shutdown`).
Worker to router: facts (`Ready`, `LoadFailed`, `Alive`, `BatchDone`, `BatchFailed`).
Also the spawn argument `WorkerSpec`, the other wire type between the two processes (on the worker's stdin). The
family option Structs it carries (`DenseOptions` and the rest) and the defaults they share live in `options.py`: they
are a schema the router checks bundles against and the adapters read, not messages of their own.
This module imports only msgspec, numpy, the standard library, `sie_sdk.types` and `sie_worker.options` (itself only
msgspec and the standard library); arrays cross as `Tensor`, never pickle.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

import msgspec
import numpy as np

from sie_sdk.codes import ErrorCode
from sie_sdk.types import Classification, DetectedObject, Entity, Relation
from sie_worker.options import MAX_BATCH_TOKENS, FamilyOptions, Options


class LoadErrorClass(StrEnum):
    """Why a model failed to load (sie-native.md, section 9). Permanent classes wait for an operator; the others
    are retried after a cooldown."""

    NOT_FOUND = "NOT_FOUND"  # the weights or a file the model needs are not there
    CONFIG = "CONFIG"  # the model's config or the family asked for cannot work
    DEPENDENCY = "DEPENDENCY"  # a package the family needs is not installed
    GATED = "GATED"
    OOM = "OOM"  # the device had no room for the model
    STORAGE = "STORAGE"  # an OS error such as EMFILE or ENOMEM
    NETWORK = "NETWORK"
    TIMEOUT = "TIMEOUT"  # the worker did not say Ready within the load timeout
    PLACEMENT = "PLACEMENT"
    ENGINE = "ENGINE"  # the worker crashed while loading, or the engine raised something unforeseen
    UNKNOWN = "UNKNOWN"

    @property
    def permanent(self) -> bool:
        return self in _PERMANENT


_PERMANENT = frozenset({LoadErrorClass.NOT_FOUND, LoadErrorClass.CONFIG, LoadErrorClass.DEPENDENCY,
                        LoadErrorClass.GATED})


class Tensor(msgspec.Struct, array_like=True, gc=False):
    """A numpy array as dtype string, shape and raw C-order bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Tensor:
        array = np.ascontiguousarray(array)
        return cls(array.dtype.str, tuple(array.shape), array.tobytes())

    def numpy(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape)


class InputItem(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One input as the worker sees it: text already templated by the router, images as encoded bytes."""

    text: str | None = None
    images: list[bytes] = []


class BatchTiming(msgspec.Struct, array_like=True, gc=False):
    """Milliseconds the worker spent on each phase of one batch."""

    tokenize_ms: float = 0.0
    inference_ms: float = 0.0
    postprocess_ms: float = 0.0


class Result(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, kw_only=True, gc=False):
    """Base of the payloads a `BatchDone` carries."""


class EncodeResult(Result):
    """Encode outputs for a batch, row i belonging to item i.

    Sparse rows and multivector rows are packed CSR-style: item i owns entries `offsets[i]:offsets[i + 1]`.
    """

    token_counts: list[int]
    dense: Tensor | None = None
    sparse_indices: Tensor | None = None
    sparse_values: Tensor | None = None
    sparse_offsets: list[int] | None = None
    multivector: Tensor | None = None
    multivector_offsets: list[int] | None = None


class ScoreResult(Result):
    """One score per (query, document) pair, in pair order; `raw` holds the logits before activation."""

    scores: Tensor
    raw: Tensor
    token_counts: list[int]


class ExtractItem(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """What was extracted from one item."""

    entities: list[Entity] = []
    relations: list[Relation] = []
    classifications: list[Classification] = []
    objects: list[DetectedObject] = []
    data: dict[str, Any] = {}


class ExtractResult(Result):
    """Extraction results, one per item in batch order."""

    items: list[ExtractItem]
    token_counts: list[int]


class Token(msgspec.Struct, array_like=True, gc=False):
    """One token of a tokenized text: id, its text, whether it is special, character offsets (None for specials)."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TokenizeResult(Result):
    """Tokens per text for a `TokenizeBatch`, or decoded strings per id list for a `DecodeBatch`."""

    token_counts: list[int]
    tokens: list[list[Token]] = []
    texts: list[str] = []


class Message(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, kw_only=True):
    """Base of every ZeroMQ message; the tag selects the type on decode."""


class EncodeBatch(Message, gc=False):
    """Encode these items; `output_types` is the union the requests in the batch asked for."""

    batch_id: int
    items: list[InputItem]
    output_types: list[str]
    is_query: bool = False
    options: dict[str, Any] = {}
    # The W3C traceparent of the router's batch span when tracing is on, else omitted from the frame; last, and
    # optional, so a peer without it still decodes the message.
    trace: str | None = None


class ScoreBatch(Message, gc=False):
    """Score each (query, document) pair."""

    batch_id: int
    pairs: list[tuple[str, str]]
    options: dict[str, Any] = {}
    # The W3C traceparent of the router's batch span when tracing is on, else omitted from the frame; last, and
    # optional, so a peer without it still decodes the message.
    trace: str | None = None


class ExtractBatch(Message, gc=False):
    """Extract from each item, against `labels` when the model is label-driven."""

    batch_id: int
    items: list[InputItem]
    labels: list[str] = []
    options: dict[str, Any] = {}
    # The W3C traceparent of the router's batch span when tracing is on, else omitted from the frame; last, and
    # optional, so a peer without it still decodes the message.
    trace: str | None = None


class TokenizeBatch(Message):
    """Tokenize each text with the model's tokenizer (no forward pass)."""

    batch_id: int
    texts: list[str]
    add_special_tokens: bool = True


class DecodeBatch(Message):
    """Decode each id list back to text with the model's tokenizer."""

    batch_id: int
    ids: list[list[int]]
    skip_special_tokens: bool = True


class Ping(Message):
    """Answer `Alive` at once, busy or idle: the router's liveness check."""


class Shutdown(Message):
    """Finish the batches already received, then exit 0."""


# The engine a worker runs its model on: torch, or an exported graph under ONNX Runtime or OpenVINO ("fake": the test
# adapter, which runs no model).
RunEngine = Literal["torch", "onnx", "openvino", "fake"]


class Ready(Message):
    """The model is loaded and the worker takes batches; sent once, first."""

    worker_id: str
    model: str
    device: str
    memory_bytes: int
    dims: dict[str, int]
    capabilities: list[str]
    engine: RunEngine
    max_sequence_length: int | None = None
    # What the forward computes in (float32, bfloat16, float16): a lean runtime's own choice under `auto`, which the
    # configured precision alone does not say (TEI's /info `model_dtype`, the model listing).
    precision: str = "float32"
    load_seconds: float = 0.0
    pid: int = 0
    # Device memory the CUDA context took (free memory before and after CUDA init); 0 on the CPU. NVML's per-process
    # figure includes it; the router adds it to `memory_bytes` where NVML has no such figure.
    context_bytes: int = 0


class LoadFailed(Message):
    """The model could not load; the worker exits after sending this."""

    worker_id: str
    code: ErrorCode
    error_class: LoadErrorClass
    message: str


class Alive(Message):
    """The answer to `Ping`, from the thread that receives batches, sent beside any batch in hand."""


class ExportStarting(Message):
    """The load is about to export the model's graph in a helper process (torch); the router reserves its memory."""


class BatchDone(Message, gc=False):
    """The batch succeeded."""

    batch_id: int
    result: EncodeResult | ScoreResult | ExtractResult | TokenizeResult
    timing: BatchTiming = msgspec.field(default_factory=BatchTiming)
    # torch's CUDA allocator after the batch (0 on the CPU): the router's ledger follows a worker's growth under
    # traffic with these where NVML has no per-process figure (a container without the host's PID namespace).
    memory_allocated: int = 0
    memory_reserved: int = 0


class BatchFailed(Message):
    """The batch failed; `code` is one of the shared codes (for example `RESOURCE_EXHAUSTED`), checked on decode."""

    batch_id: int
    code: ErrorCode
    message: str


RouterToWorker = EncodeBatch | ScoreBatch | ExtractBatch | TokenizeBatch | DecodeBatch | Ping | Shutdown
WorkerToRouter = Ready | LoadFailed | Alive | ExportStarting | BatchDone | BatchFailed
ALL_MESSAGES: tuple[type[Message], ...] = (EncodeBatch, ScoreBatch, ExtractBatch, TokenizeBatch, DecodeBatch, Ping,
                                           Shutdown, Ready, LoadFailed, Alive, ExportStarting, BatchDone,
                                           BatchFailed)

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(RouterToWorker)
_to_router = msgspec.msgpack.Decoder(WorkerToRouter)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode_for_worker(frame: bytes | memoryview) -> RouterToWorker:
    return _to_worker.decode(frame)


def decode_for_router(frame: bytes | memoryview) -> WorkerToRouter:
    return _to_router.decode(frame)


def batch_id_of(frame: bytes | memoryview) -> int | None:
    """The batch a reply that failed to decode was about, if its frame still says (a `BatchFailed` whose code this
    router does not know, for one): the router can then fail that batch at once rather than wait for its deadline."""
    try:
        fields = msgspec.msgpack.decode(frame)
    except msgspec.DecodeError:
        return None
    if (isinstance(fields, list) and len(fields) > 1 and fields[0] in ("BatchDone", "BatchFailed")
            and isinstance(fields[1], int)):
        return fields[1]
    return None


def _check_registry() -> None:
    # Like SGLang's io_struct: a Message subclass that is not in the unions would silently fail to decode.
    missing = {cls.__name__ for cls in Message.__subclasses__()} - {cls.__name__ for cls in ALL_MESSAGES}
    if missing:
        raise TypeError(f"Message subclasses missing from the unions: {sorted(missing)}")


_check_registry()


class WorkerSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to start one worker: passed once, encoded, as the spawn argument (not a Message: it never crosses ZeroMQ)."""

    worker_id: str
    model: str
    adapter: str
    weights_dir: str
    to_worker_endpoint: str
    from_worker_endpoint: str
    device: str = "cpu"
    compute_precision: str | None = None
    max_sequence_length: int | None = None
    options: FamilyOptions | None = None  # the profile's adapter options; None: the family's defaults
    threads: int = 0
    env: dict[str, str] = {}
    max_batch_tokens: int = MAX_BATCH_TOKENS
    # `--device auto`: a worker placed on a GPU whose torch has no CUDA runs on the CPU (with a warning) instead of
    # failing its load.
    cpu_fallback: bool = False
    # Logs as JSON lines; spans of traced batches exported to this OTLP/HTTP traces URL under this service name.
    log_format: str = "text"
    otlp_endpoint: str | None = None
    otlp_service_name: str = "sie"
    # `--trust-remote-code`: a checkpoint whose config names custom code (`auto_map`) loads it, on torch; else the
    # load is refused, naming the flag.
    trust_remote_code: bool = False

    def options_as(self, kind: type[Options]) -> Options:
        """The options as `kind` (the family's Struct, or `Common`): the defaults where the spec carries none."""
        if self.options is None:
            return kind()
        if not isinstance(self.options, kind):
            raise TypeError(f"a {self.adapter} worker was sent {type(self.options).__name__}")
        return self.options
