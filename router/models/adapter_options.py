"""Per-family adapter options (router process): one typed Struct per family, checked when a bundle loads.

A profile's `loadtime` and `runtime` options are validated together against their family's Struct, so a misspelt
key or a wrong type fails at start, naming the file and profile, instead of being ignored by a worker later.
One precedence rule holds for every family: a request's option wins over the profile's, which wins over what the
checkpoint's own files say, which wins over the adapter's default. A key may be set in `loadtime` or in `runtime`,
not in both with different values: adapters read the two in different orders, so such a profile has no one meaning.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class Common(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options the router reads itself (templates, instructions, outputs) and `truncate`, for every family."""

    query_template: str | None = None
    doc_template: str | None = None
    default_instruction: str | None = None
    instruction: str | None = None
    is_query: bool | None = None
    output_types: list[Literal["dense", "sparse", "multivector"]] | None = None
    output_dtype: str | None = None
    truncate: bool | None = None
    # GPU loads warm up at the full token budget; on the CPU only dense does, the others run one small forward.
    warm_up: Literal["budget", "small"] | None = None


class DenseOptions(Common):
    pooling: Literal["mean", "cls", "last", "last_token", "none"] | None = None
    normalize: bool | None = None
    engine: Literal["torch", "onnx", "openvino", "auto"] | None = None
    onnx_lanes: int | None = None  # calls side by side: ORT calls, or OpenVINO streams
    onnx_cache_dir: str | None = None  # where exported graphs are cached (default ~/.cache/sie/graphs)
    onnx_arena: bool | None = None  # ORT's CPU memory arena; off by default (it keeps the longest batch's memory)
    micro_batch_tokens: int | None = None  # most padded tokens in one forward call of a lean worker (default 1024)


class SparseOptions(Common):
    pooling_strategy: Literal["max", "sum"] | None = None
    activation_function: Literal["relu", "log1p_relu"] | None = None


class MultivectorOptions(Common):
    query_prefix: str | None = None
    doc_prefix: str | None = None
    query_max_length: int | None = None
    doc_max_length: int | None = None
    token_dim: int | None = None
    normalize: bool | None = None
    query_expansion: bool | None = None
    attend_to_expansion_tokens: bool | None = None
    skiplist_words: list[str] | None = None


class HybridOptions(Common):
    normalize: bool | None = None


class ClipOptions(Common):
    normalize: bool | None = None
    inputs: list[Literal["text", "image"]] | dict[str, bool] | None = None
    max_image_pixels: int | None = None
    max_image_bytes: int | None = None


class CrossEncoderOptions(Common):
    raw_scores: bool | None = None


class ClassifierOptions(Common):
    hypothesis_template: str | None = None
    multi_label: bool | None = None
    raw_scores: bool | None = None
    zero_shot: bool | None = None


class GlinerOptions(Common):
    threshold: float | None = None
    flat_ner: bool | None = None
    multi_label: bool | None = None


class NerOptions(Common):
    pass


class FakeOptions(Common):
    """The fake adapter's fault injection (tests)."""

    dim: int | None = None
    load_delay_s: float | None = None
    batch_delay_s: float | None = None
    fail_load: str | None = None
    memory_mb: int | None = None
    crash_on_batch: int | None = None
    oom_on_batch: int | None = None
    oom_over_items: int | None = None
    cuda_error_on_batch: int | None = None
    fail_loads: int | None = None
    fail_loads_file: str | None = None
    batch_delay_per_item_s: float | None = None
    grow_mb_per_batch: int | None = None


FAMILIES: dict[str, type[Common]] = {
    "dense": DenseOptions, "sparse": SparseOptions, "multivector": MultivectorOptions, "hybrid": HybridOptions,
    "clip": ClipOptions, "cross_encoder": CrossEncoderOptions, "classifier": ClassifierOptions,
    "gliner": GlinerOptions, "ner": NerOptions, "fake": FakeOptions,
}


def check_options(family: str, loadtime: dict[str, Any], runtime: dict[str, Any]) -> Common:
    """The profile's options as its family's Struct; ValueError names the problem."""
    clash = sorted(k for k in set(loadtime) & set(runtime) if loadtime[k] != runtime[k])
    if clash:
        raise ValueError(f"adapter_options set {clash} in both loadtime and runtime with different values; set each "
                         "once")
    kind = FAMILIES.get(family, Common)
    try:
        return msgspec.convert({**loadtime, **runtime}, kind)
    except msgspec.ValidationError as exc:
        raise ValueError(f"adapter_options for a {family} model: {exc}") from None
