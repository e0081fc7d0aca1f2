"""Family options (router and worker processes): what a model config's `adapter_options` may set, one msgspec Struct
per family, and the defaults and family facts both processes read (batch token budgets, image limits, the engine,
the graph-export helper's memory, the families a lean worker serves).

Not wire messages: nothing here crosses ZeroMQ on its own. They travel inside the spawn argument `WorkerSpec`, which
stays with the messages in `protocol.py` (the one module of router-worker wire types); this module is their schema
and their defaults, which the router checks a bundle against at load and the adapters read. It imports only msgspec
and the standard library, so the router may import it without torch.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import msgspec

# What a CPU worker's process gets unless the server's environment says otherwise (the router's launch sets it, and a
# worker that falls back from a GPU placement sets it itself). The Rust tokenizer's own thread pool off: its threads
# spin for work beside the forward's calls on the same cores, and cost about a quarter more CPU than one thread. A lean
# worker splits a batch over threads itself, only while its lanes are idle (adapters.lean_engine.tokenize_parts); a
# torch worker on the CPU tokenises on one thread. b32c4 and b256c1 moved within the runs' spread, either way
# (bench/README.md, "tokens beside the forward").
CPU_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}

# The router checks a profile's `loadtime` and `runtime` options against its family's Struct when a bundle loads and
# sends the Struct in the worker's spec; each default below is the only one. A field that is None by default is one
# the checkpoint's own files may declare: the adapter then takes the checkpoint's value, else its own stated fallback.

MAX_BATCH_TOKENS = 16384  # a worker's token budget per batch, where the profile sets no `max_batch_tokens`
GPU_MAX_BATCH_TOKENS = 32768  # the same on a GPU, whose forward costs little more at twice the tokens
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # the server's image limits (Settings), under a CLIP profile's own
MAX_IMAGE_PIXELS = 40_000_000
Engine = Literal["auto", "torch", "onnx", "openvino"]
DEFAULT_ENGINE: Engine = "auto"  # the server's dense engine on the CPU (Settings), under a profile's own
RUNTIME_LANES = 0  # lean workers' forward calls side by side; 0: the runtime's default (one OpenVINO stream)
# The graph-export helper's peak memory (RSS), beside the worker that started it, for placement to reserve while it
# runs: its libraries (torch, transformers, ONNX, OpenVINO) plus about four times the weight files (the float32 model,
# its trace, the ONNX and IR serialisations). Measured peaks (GNU time, 2 cores): a tiny BERT 513 MiB, MiniLM-L6
# (87 MiB of weights) 914 MiB, a random BERT-base (418 MiB) 2184 MiB.
EXPORT_HELPER_BASE_BYTES = 576 * 2**20
EXPORT_HELPER_WEIGHTS_FACTOR = 4
# The families a CPU worker serves without torch, from an exported graph under OpenVINO or ONNX Runtime, unless its
# `engine` option is torch: the worker builds them so (adapters.build_adapter), and the router's placement estimates
# their workers so before the first one has measured itself.
LEAN_FAMILIES = frozenset({"dense", "cross_encoder", "sparse", "multivector", "classifier", "ner", "hybrid",
                           "clip"})


class Common(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True, tag_field="family"):
    """Options of every family; the router reads the templates, instructions and outputs itself."""

    query_template: str | None = None
    doc_template: str | None = None
    default_instruction: str | None = None
    instruction: str | None = None
    is_query: bool | None = None
    output_types: list[Literal["dense", "sparse", "multivector"]] | None = None
    output_dtype: str | None = None
    truncate: bool | None = None
    # None: load() warms up at the full token budget on a GPU, and on the CPU only where the family does by default.
    warm_up: Literal["budget", "small"] | None = None


PoolingName = Literal["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken", "last", "last_token"]


class GraphEngineOptions(Common):
    """The engine options of every family a lean worker serves from an exported graph on the CPU (dense, sparse,
    ColBERT, BGE-M3, cross-encoders, classifiers, NER): which runtime, how many calls side by side, where graphs are
    cached."""

    # On the CPU, auto takes OpenVINO where it is installed, else ONNX Runtime; GPUs always run torch.
    engine: Engine = DEFAULT_ENGINE
    onnx_lanes: int = RUNTIME_LANES  # calls side by side (ORT calls, or OpenVINO streams)
    onnx_cache_dir: str | None = None  # where exported graphs are cached; None: ~/.cache/sie/graphs
    onnx_arena: bool = False  # ORT's CPU memory arena; off, as it keeps the longest batch's memory
    # The most padded tokens in one forward call of a lean worker. A runtime keeps the working memory of the largest
    # call it has run, about 14 MiB per 256 tokens for MiniLM under OpenVINO; on CPU a token costs no less in a call of
    # 4096 than of 1024 (a MiniLM worker after 259 corpus sentences: 1024: 272 MiB, 603 s/s; 2048: 326 MiB, 570 s/s;
    # 4096: 417 MiB, 568 s/s; bench/README.md, "lean workers").
    micro_batch_tokens: int = 1024


class DenseOptions(GraphEngineOptions, tag="dense"):
    """Dense encoders: torch, or on the CPU an exported graph under OpenVINO or ONNX Runtime."""

    # sentence-transformers' pooling modes (and our `last`, `last_token` for lasttoken); None: the checkpoint's, else
    # mean. A mode no engine computes fails the load.
    pooling: PoolingName | None = None
    normalize: bool | None = None  # None: whether the checkpoint has a Normalize module
    # The text put before each input (sentence-transformers' prompt), or the name of one of the checkpoint's prompts;
    # None: the checkpoint's `default_prompt_name`, if any. A request's `prompt` / `prompt_name` wins.
    prompt: str | None = None
    prompt_name: str | None = None


class SparseOptions(GraphEngineOptions, tag="sparse"):
    """SPLADE: None takes the checkpoint's SpladePooling, else max pooling of relu."""

    pooling_strategy: Literal["max", "sum"] | None = None
    activation_function: Literal["relu", "log1p_relu"] | None = None


class MultivectorOptions(GraphEngineOptions, tag="multivector"):
    """ColBERT: None takes what the checkpoint declares (colbert-ir metadata, PyLate configs), else the adapter's
    fallback ([Q] / [D] markers, 32 query tokens, query expansion on, punctuation skipped)."""

    query_prefix: str | None = None
    doc_prefix: str | None = None
    query_max_length: int | None = None
    doc_max_length: int | None = None  # None: the checkpoint's, else the tokenizer's (at most 512)
    token_dim: int | None = None  # a check: the load fails unless the checkpoint projects to this width
    normalize: bool = True
    query_expansion: bool | None = None
    attend_to_expansion_tokens: bool | None = None
    skiplist_words: list[str] | None = None


class HybridOptions(GraphEngineOptions, tag="hybrid"):
    """BGE-M3's dense, sparse and multivector heads."""

    normalize: bool = True


class ClipOptions(GraphEngineOptions, tag="clip"):
    """CLIP text and image towers."""

    normalize: bool = True
    inputs: list[Literal["text", "image"]] | dict[str, bool] | None = None  # None: both
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_image_bytes: int = MAX_IMAGE_BYTES


class CrossEncoderOptions(GraphEngineOptions, tag="cross_encoder"):
    """Rerankers; `raw_scores` is the router's."""

    raw_scores: bool | None = None


class ClassifierOptions(GraphEngineOptions, tag="classifier"):
    """Sequence classification and NLI zero-shot; a request's option wins over these."""

    hypothesis_template: str = "This example is {}."
    multi_label: bool = False
    raw_scores: bool = False
    zero_shot: bool | None = None  # None: zero-shot where the head has an entailment label


class GlinerOptions(Common, tag="gliner"):
    """GLiNER span extraction; a request's option wins over these."""

    threshold: float = 0.5
    flat_ner: bool = True
    multi_label: bool = False


class NerOptions(GraphEngineOptions, tag="ner"):
    """Token-classification NER: torch, or on the CPU an exported graph under OpenVINO or ONNX Runtime."""


class FakeOptions(Common, tag="fake"):
    """The fake adapter's width and fault injection (tests); batch numbers are 1-based."""

    dim: int = 16
    load_delay_s: float = 0.0
    batch_delay_s: float = 0.0
    batch_delay_per_item_s: float = 0.0
    fail_load: str | None = None  # a message: the load fails with it
    fail_loads: int = 0  # the first this many loads fail with EMFILE, counted in `fail_loads_file`
    fail_loads_file: str | None = None
    memory_mb: int = 0  # MiB held from load
    grow_mb_per_batch: int = 0  # MiB more held after every batch
    crash_on_batch: int | None = None
    oom_on_batch: int | None = None
    oom_over_items: int | None = None  # a batch of more items runs out of memory
    cuda_error_on_batch: int | None = None  # from that batch on, as a broken CUDA context does
    announce_export: bool = False  # say `ExportStarting` before the load, as a lean worker's first load does


FamilyOptions = (DenseOptions | SparseOptions | MultivectorOptions | HybridOptions | ClipOptions | CrossEncoderOptions
                 | ClassifierOptions | GlinerOptions | NerOptions | FakeOptions)
# Family name -> its option Struct; the tag each Struct carries is its family's name.
FAMILY_OPTIONS: dict[str, type[Common]] = {
    str(cls.__struct_config__.tag): cls
    for cls in (DenseOptions, SparseOptions, MultivectorOptions, HybridOptions, ClipOptions, CrossEncoderOptions,
                ClassifierOptions, GlinerOptions, NerOptions, FakeOptions)}
Options = TypeVar("Options", bound=Common)
