"""Decoding request inputs into jobs (router process): item checks, option merging, templates, encode jobs.

Shared by every API module, so that no route module imports another.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import msgspec

from sie_router.errors import SIEError, invalid
from sie_router.models.config import ModelConfig
from sie_router.pipeline.jobs import BatchKey, EncodeJob, Resolved, freeze
from sie_router.pipeline.token_ids import decode_token_ids
from sie_router.settings import Settings
from sie_sdk.codes import ErrorCode
from sie_sdk.types import OUTPUT_DTYPES, EncodeParams, ImageInput, Item
from sie_worker.protocol import InputItem

# Options the router consumes itself; everything else in the merged options goes to the worker.
ROUTER_OPTIONS = frozenset({"is_query", "profile", "output_types", "output_dtype", "instruction", "query_template",
                            "doc_template", "default_instruction"})
MAX_INPUTS = 2048


def input_items(items: list[Item], config: ModelConfig, limits: Settings, *, allow_images: bool = True,
                field: str = "items") -> list[InputItem]:
    """Check each item (text or images, within the size limits, a modality the model takes) and strip it down."""
    max_items, max_item_bytes = limits.max_items_per_request, limits.max_item_bytes
    max_image_bytes = limits.max_image_bytes
    if not items:
        raise invalid(f"`{field}` must hold at least one item", param=field)
    if len(items) > max_items:
        raise invalid(f"`{field}` holds {len(items)} items, over the limit of {max_items} per request; split the "
                      "request", param=field)
    takes_images = "image" in config.input_kinds
    out: list[InputItem] = []
    for i, item in enumerate(items):
        images = [image.data for image in item.images or []]
        if item.text is None and not images:
            raise invalid(f"item has neither text nor image - at `$.{field}[{i}]`", param=f"{field}[{i}]")
        size = len(item.text.encode()) if item.text else 0
        if size > max_item_bytes:
            raise SIEError(ErrorCode.INVALID_INPUT,
                           f"item text is {size} bytes, over the {max_item_bytes}-byte limit - at "
                           f"`$.{field}[{i}].text`", param=f"{field}[{i}].text")
        for j, data in enumerate(images):
            if len(data) > max_image_bytes:
                raise invalid(f"image is {len(data)} bytes, over the {max_image_bytes}-byte limit - at "
                              f"`$.{field}[{i}].images[{j}]`", param=f"{field}[{i}].images[{j}]")
        if images and not (takes_images and allow_images):
            raise invalid(f"model '{config.sie_id}' does not take image input - at `$.{field}[{i}].images`",
                          param=f"{field}[{i}].images")
        if not images and "text" not in config.input_kinds:  # an image-only model: text alone has no tower to go to
            raise invalid(f"model '{config.sie_id}' takes only {config.input_kinds} input, not text - at "
                          f"`$.{field}[{i}].text`", param=f"{field}[{i}].text")
        out.append(InputItem(text=item.text, images=images))
    return out


# Options the router reads itself, by the type it needs; a wrong type is the client's error (400), not ours.
_STR_OPTIONS = ("profile", "instruction", "query_template", "doc_template", "default_instruction", "output_dtype")
_BOOL_OPTIONS = ("is_query", "truncate")


def check_option_types(options: dict[str, Any]) -> None:
    for name, value in options.items():
        wrong = ((name in _STR_OPTIONS and value is not None and not isinstance(value, str))
                 or (name in _BOOL_OPTIONS and not isinstance(value, bool))
                 or (name == "output_types" and value is not None
                     and not (isinstance(value, list) and all(isinstance(t, str) for t in value))))
        if wrong:
            raise invalid(f"option {name!r} has the wrong type: {type(value).__name__}", param=f"options.{name}")


def merged_options(model: Resolved, options: dict[str, Any] | None) -> dict[str, Any]:
    """Profile runtime options under the request's (request wins, shallow); `options.profile` picks the profile."""
    options = dict(options or {})
    check_option_types(options)
    chosen = options.get("profile") or model.profile
    if chosen not in model.config.profiles:
        raise invalid(f"unknown profile {chosen!r} for model '{model.key}'; known: {sorted(model.config.profiles)}",
                      param="options.profile")
    return {**model.config.profiles[chosen].adapter_options.runtime, **options}


def worker_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in ROUTER_OPTIONS}


def score_key(model: Resolved, options: dict[str, Any] | None) -> BatchKey:
    """The batch key of a score call: the profile's runtime options under the request's."""
    merged = merged_options(model, options)
    return BatchKey("score", options=freeze({k: v for k, v in merged.items() if k not in ("profile", "instruction")}))


def apply_template(text: str, runtime: dict[str, Any], is_query: bool, instruction: str | None) -> str:
    template = runtime.get("query_template" if is_query else "doc_template")
    if not template:
        return text
    instruction = instruction or runtime.get("default_instruction") or ""
    return str(template).replace("{instruction}", instruction).replace("{text}", text)


def encode_job(model: Resolved, items: Sequence[InputItem], output_types: Sequence[str], *, runtime: dict[str, Any],
               options: dict[str, Any], is_query: bool = False, instruction: str | None = None,
               wait_s: float | None = None) -> EncodeJob:
    """An encode job: texts templated by the profile's `runtime`, `options` for the worker frozen into the key. A
    template is the model config's own formatting: a dense worker then puts no prompt of the checkpoint's before it,
    unless the request names one."""
    templated = [InputItem(text=None if i.text is None else apply_template(i.text, runtime, is_query, instruction),
                           images=i.images) for i in items]
    if runtime.get("query_template" if is_query else "doc_template") and not {"prompt", "prompt_name"} & set(options):
        options = {**options, "prompt": ""}
    key = BatchKey("encode", tuple(sorted(output_types)), is_query, options=freeze(options))
    return EncodeJob(model, templated, key, wait_s)


def native_encode(model: Resolved, items: list[InputItem], params: EncodeParams | None) -> tuple[EncodeJob, str]:
    """The encode job and the output dtype for a native request."""
    params = params or EncodeParams()
    options = merged_options(model, params.options)
    output_types = list(options.get("output_types") or params.output_types or ["dense"])
    config = model.config
    offered = set(config.dims) | {k for k in config.outputs if k in ("dense", "sparse", "multivector")}
    unsupported = [t for t in output_types if t not in offered]
    if unsupported or not output_types:
        raise invalid(f"model '{config.sie_id}' does not support output types {unsupported}; it offers "
                      f"{sorted(offered)}", param="params.output_types")
    output_dtype = params.output_dtype or options.get("output_dtype") or "float32"
    if output_dtype not in OUTPUT_DTYPES:
        raise invalid(f"output_dtype must be one of {list(OUTPUT_DTYPES)}, not {output_dtype!r}",
                      param="params.output_dtype")
    job = encode_job(model, items, output_types, runtime=options, options=worker_options(options),
                     is_query=bool(options.get("is_query", False)),
                     instruction=params.instruction or options.get("instruction"))
    return job, str(output_dtype)


def parse_texts(raw: Any, *, allow_token_ids: bool) -> list[str]:
    """OpenAI/Infinity `input` as texts: a string, a list of strings, or token-id arrays decoded from cl100k_base."""
    if raw is msgspec.UNSET:
        raise invalid("`input` is required", param="input")
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list) or not raw:
        raise invalid("`input` must be a string, a non-empty list of strings, or token-id arrays", param="input")
    if len(raw) > MAX_INPUTS:
        raise invalid(f"`input` holds {len(raw)} entries; at most {MAX_INPUTS}", param="input")
    if all(isinstance(x, str) for x in raw):
        return list(raw)
    if allow_token_ids and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        return [decode_token_ids(raw)]
    if allow_token_ids and all(isinstance(x, list) and x and all(isinstance(i, int) for i in x) for x in raw):
        return [decode_token_ids(x) for x in raw]
    raise invalid("`input` must be a string, a list of strings, or token-id arrays", param="input")


def image_items(texts: list[str]) -> list[Item]:
    """Infinity's image input: `data:image/...;base64,` URIs (remote URLs are refused: an SSRF risk)."""
    items = []
    for i, uri in enumerate(texts):
        head, _, payload = uri.partition(",")
        if not (head.startswith("data:image/") and head.endswith(";base64")):
            raise SIEError(ErrorCode.INVALID_MEDIA,
                           f"input[{i}] must be a data:image/...;base64 URI; remote image URLs are "
                           "disabled on this server", param="input")
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:
            raise SIEError(ErrorCode.INVALID_MEDIA, f"input[{i}] is not valid base64", param="input") from None
        items.append(Item(images=[ImageInput(data=data, format=head[len("data:image/"):-len(";base64")])]))
    return items


def check_dimensions(dimensions: int | None, native: int) -> int:
    if dimensions is None or dimensions == 0:
        return native
    if not 1 <= dimensions <= native:
        raise SIEError(ErrorCode.INVALID_DIMENSIONS, f"dimensions must be between 1 and {native}, not {dimensions}",
                       param="dimensions")
    return dimensions
