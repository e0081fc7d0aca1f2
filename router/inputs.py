"""Validating request items and planning encode calls against a model config (router process)."""

from __future__ import annotations

from typing import Any

from sie_router.errors import SIEError, invalid
from sie_router.registry import ModelConfig
from sie_router.service import ROUTER_OPTIONS, EncodePlan
from sie_router.settings import Settings
from sie_sdk.types import OUTPUT_DTYPES, EncodeParams, Item
from sie_worker.protocol import InputItem

# Defaults of the matching `Settings` fields, for callers that do not pass their own.


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
            raise SIEError("INVALID_INPUT", f"item text is {size} bytes, over the {max_item_bytes}-byte limit - at "
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


def merged_options(config: ModelConfig, profile: str,
                   options: dict[str, Any] | None) -> tuple[ModelConfig, dict[str, Any]]:
    """Profile runtime options under the request's (request wins, shallow); `options.profile` picks the profile."""
    options = dict(options or {})
    check_option_types(options)
    chosen = options.get("profile") or profile
    if chosen not in config.profiles:
        raise invalid(f"unknown profile {chosen!r} for model '{config.sie_id}'; known: {sorted(config.profiles)}",
                      param="options.profile")
    return config, {**config.profiles[chosen].adapter_options.runtime, **options}


def plan_encode(config: ModelConfig, profile: str, params: EncodeParams | None) -> tuple[EncodePlan, str]:
    """The encode plan and the output dtype for a native request."""
    params = params or EncodeParams()
    _, options = merged_options(config, profile, params.options)
    output_types = list(options.get("output_types") or params.output_types or ["dense"])
    offered = set(config.dims) | {k for k in config.outputs if k in ("dense", "sparse", "multivector")}
    unsupported = [t for t in output_types if t not in offered]
    if unsupported or not output_types:
        raise invalid(f"model '{config.sie_id}' does not support output types {unsupported}; it offers "
                      f"{sorted(offered)}", param="params.output_types")
    output_dtype = params.output_dtype or options.get("output_dtype") or "float32"
    if output_dtype not in OUTPUT_DTYPES:
        raise invalid(f"output_dtype must be one of {list(OUTPUT_DTYPES)}, not {output_dtype!r}",
                      param="params.output_dtype")
    plan = EncodePlan(output_types=output_types, is_query=bool(options.get("is_query", False)),
                      instruction=params.instruction or options.get("instruction"),
                      worker_options={k: v for k, v in options.items() if k not in ROUTER_OPTIONS}, runtime=options)
    return plan, str(output_dtype)
