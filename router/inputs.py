"""Validating request items and planning encode calls against a model config (router process)."""

from __future__ import annotations

from typing import Any

from sie_router.errors import SIEError, invalid
from sie_router.registry import ModelConfig
from sie_router.service import ROUTER_OPTIONS, EncodePlan
from sie_sdk.types import OUTPUT_DTYPES, EncodeParams, Item
from sie_worker.protocol import InputItem


def input_items(items: list[Item], config: ModelConfig, max_item_bytes: int, *, allow_images: bool = True,
                field: str = "items") -> list[InputItem]:
    """Check each item (text or images, within the size limit, a modality the model takes) and strip it down."""
    if not items:
        raise invalid(f"`{field}` must hold at least one item", param=field)
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
        if images and not (takes_images and allow_images):
            raise invalid(f"model '{config.sie_id}' does not take image input - at `$.{field}[{i}].images`",
                          param=f"{field}[{i}].images")
        out.append(InputItem(text=item.text, images=images))
    return out


def merged_options(config: ModelConfig, profile: str, options: dict[str, Any] | None) -> tuple[ModelConfig, dict[str, Any]]:
    """Profile runtime options under the request's (request wins, shallow); `options.profile` picks the profile."""
    options = dict(options or {})
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
