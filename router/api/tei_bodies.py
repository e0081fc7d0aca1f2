"""TEI 1.9.3's request bodies and their checks (router process), for `sie_router.api.tei`.

Unknown keys are ignored, as TEI does; a body that does not fit is axum's plain-text 422, not the JSON envelope.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import numpy as np

from sie_router.errors import SIEError
from sie_router.models.model_card import ModelCard
from sie_router.settings import Settings
from sie_sdk.codes import ErrorCode

T = TypeVar("T")
DIRECTIONS = {"right": "right", "Right": "right", "left": "left", "Left": "left"}


class EmbedRequest(msgspec.Struct, kw_only=True):
    """`/embed`, `/embed_sparse`, `/embed_all`: `inputs` is a string, token ids, or a list mixing both."""

    inputs: Any
    truncate: bool | None = None
    truncation_direction: str = "right"
    prompt_name: str | None = None
    normalize: bool = True
    dimensions: int | None = None


class PredictRequest(msgspec.Struct, kw_only=True):
    """`/predict`: a text, a pair, or a batch of texts and pairs."""

    inputs: Any
    truncate: bool | None = None
    truncation_direction: str = "right"
    raw_scores: bool = False


class TEIRerankRequest(msgspec.Struct, kw_only=True):
    """`/rerank` (TEI's dialect: `texts`, no `top_n`)."""

    query: str
    texts: list[str]
    truncate: bool | None = None
    truncation_direction: str = "right"
    raw_scores: bool = False
    return_text: bool = False


class SimilarityInputs(msgspec.Struct):
    source_sentence: str
    sentences: list[str]


class SimilarityParameters(msgspec.Struct, kw_only=True):
    truncate: bool | None = None
    truncation_direction: str = "right"
    prompt_name: str | None = None


class SimilarityRequest(msgspec.Struct, kw_only=True):
    """`/similarity`: cosine of the source against each sentence."""

    inputs: SimilarityInputs
    parameters: SimilarityParameters | None = None


class TEITokenizeRequest(msgspec.Struct, kw_only=True):
    """`/tokenize`."""

    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


class TEIDecodeRequest(msgspec.Struct, kw_only=True):
    """`/decode`: one id list or a list of them."""

    ids: list[Any]
    skip_special_tokens: bool = True


class VertexRequest(msgspec.Struct, kw_only=True):
    """`/vertex`: a batch of other routes' bodies."""

    instances: list[Any]


class _Shape(msgspec.Struct):
    inputs: Any = msgspec.UNSET
    query: Any = msgspec.UNSET
    texts: Any = msgspec.UNSET


def schema_error(message: str) -> SIEError:
    return SIEError(ErrorCode.INVALID_INPUT, f"Failed to deserialize the JSON body into the target type: {message}",
                    plain_status=422)


def empty(message: str) -> SIEError:
    return SIEError(ErrorCode.INVALID_INPUT, f"Input validation error: {message}", error_type="Empty", status=400)


def validation(message: str) -> SIEError:
    return SIEError(ErrorCode.INVALID_INPUT, f"Input validation error: {message}")


def backend(message: str) -> SIEError:
    return SIEError(ErrorCode.MODEL_NOT_SUPPORTED, f"Backend error: {message}")


def decode(body: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise schema_error(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise SIEError(ErrorCode.INVALID_INPUT,
                       f"Failed to parse the request body as JSON: {exc}", plain_status=400) from None


def shape_of(body: bytes) -> str | None:
    """Which route a `POST /` body was written for, when its shape says so: "rerank", "similarity" or None."""
    try:
        shape = msgspec.json.decode(body, type=_Shape)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    if shape.query is not msgspec.UNSET and shape.texts is not msgspec.UNSET:
        return "rerank"
    return "similarity" if isinstance(shape.inputs, dict) and "source_sentence" in shape.inputs else None


def is_tei_rerank(body: bytes) -> bool:
    """`/rerank` is shared with Infinity: TEI's body carries `texts`, Infinity's `documents`."""
    try:
        shape = msgspec.json.decode(body, type=_Shape)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return False
    return shape.texts is not msgspec.UNSET


def check_batch(size: int, limit: int) -> None:
    if size > limit:
        raise validation(f"batch size {size} > maximum allowed batch size {limit}")


def _ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def embed_inputs(raw: Any, limit: int) -> list[str | list[int]]:
    """TEI's `Input`: a string; a list of ids (one input); or a list of strings and id lists (a batch)."""
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif _ids(raw):
        items = [raw]  # `[]` too: one empty input
    elif isinstance(raw, list) and all(isinstance(x, str) or _ids(x) for x in raw):
        check_batch(len(raw), limit)
        items = raw
    else:
        raise schema_error("`inputs` must be a string, a list of token ids, or a list of strings and token-id lists")
    if any(len(x) == 0 for x in items):
        raise empty("`inputs` cannot be empty")
    return items


def predict_inputs(raw: Any, limit: int) -> tuple[list[list[str]], bool]:
    """TEI's `PredictInput`: (items of one or two texts, whether it was a batch). A batch is recognised only when
    the first element is itself a list."""
    if isinstance(raw, str):
        items, batched = [[raw]], False
    elif isinstance(raw, list) and raw and isinstance(raw[0], list):
        items, batched = raw, True
        check_batch(len(items), limit)
    elif isinstance(raw, list) and 1 <= len(raw) <= 2:
        items, batched = [raw], False
    else:
        raise schema_error("`inputs` must be a text, a pair of texts, or a list of texts and pairs")
    for item in items:
        if not (isinstance(item, list) and 1 <= len(item) <= 2 and all(isinstance(t, str) for t in item)):
            raise schema_error("each `inputs` item must hold one or two strings")
        if any(not t for t in item):
            raise empty("`inputs` cannot be empty")
    return items, batched


def id_lists(raw: list[Any], limit: int) -> list[list[int]]:
    """`/decode`'s `ids`: one id list, or a list of them."""
    if _ids(raw):
        lists = [raw] if raw else []
    elif all(_ids(x) for x in raw):
        check_batch(len(raw), limit)
        lists = raw
    else:
        raise schema_error("`ids` must be a list of token ids or a list of such lists")
    if not lists or any(not x for x in lists):
        raise empty("`ids` cannot be empty")
    return lists


def prompt(card: ModelCard, name: str | None, settings: Settings) -> str:
    """The prefix for single texts: the request's `prompt_name`, else the server's default prompt (TEI flags), else
    none. Sentence-transformers' own `default_prompt_name` is not applied, as TEI does not apply it."""
    if name is None:
        if settings.default_prompt is not None:
            return settings.default_prompt
        name = settings.default_prompt_name
        if name is None:
            return ""
    if name not in card.prompts:
        raise validation(f"`default-prompt-name` `{name}` is not present in the prompts; available prompts: "
                         f"{sorted(card.prompts)}")
    return card.prompts[name]


def refuse_prompt_with_pairs(settings: Settings) -> None:
    if settings.default_prompt is not None or settings.default_prompt_name is not None:
        raise validation("`prompt_name` cannot be set with dual inputs")


def truncation(truncate: bool | None, direction: str, settings: Settings) -> dict[str, Any]:
    """Worker options: `truncate` (the server's `auto_truncate` when absent) and a left `truncation_direction`."""
    side = DIRECTIONS.get(direction)
    if side is None:
        raise schema_error(f"`truncation_direction` must be right or left, not {direction!r}")
    options: dict[str, Any] = {"truncate": settings.auto_truncate if truncate is None else truncate}
    if side == "left":
        options["truncation_direction"] = "left"
    return options


def cut(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka: the first `dimensions` values, normalised again when `normalize` (TEI: cut, then normalise)."""
    width = vectors.shape[1]
    if dimensions is None:
        return vectors
    if not 1 <= dimensions <= width:
        raise validation(f"`dimensions` must be between 1 and {width}, not {dimensions}")
    vectors = vectors[:, :dimensions]
    if not normalize:
        return vectors
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
