"""HTTP wire types of the native API, shared by the SDK and the router (decoded there with msgspec).

Unknown keys are ignored on decode, as the upstream server does, so newer clients keep working.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

OutputType = Literal["dense", "sparse", "multivector"]
OutputDType = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]
OUTPUT_TYPES: tuple[str, ...] = ("dense", "sparse", "multivector")
OUTPUT_DTYPES: tuple[str, ...] = ("float32", "float16", "int8", "uint8", "binary", "ubinary")


class ImageInput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One image: encoded bytes (JPEG, PNG, WebP, ...) and an optional format hint."""

    data: bytes
    format: str | None = None


class Item(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One input to encode, score or extract from: text, images, or both."""

    id: str | None = None
    text: str | None = None
    images: list[ImageInput] | None = None
    audio: Any = None
    video: Any = None
    document: Any = None
    metadata: dict[str, Any] | None = None
    multivector: Any = None


class EncodeParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """`params` of an encode request; every field optional."""

    output_types: list[str] | None = None
    instruction: str | None = None
    output_dtype: str | None = None
    options: dict[str, Any] | None = None


class EncodeRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Body of `POST /v1/encode/{model}`."""

    items: list[Item]
    params: EncodeParams | None = None


class ScoreRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Body of `POST /v1/score/{model}`: one query ranked against items (no `params` wrapper)."""

    query: Item
    items: list[Item]
    instruction: str | None = None
    options: dict[str, Any] | None = None


class ExtractParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """`params` of an extract request."""

    labels: list[str] | None = None
    output_schema: dict[str, Any] | None = None
    instruction: str | None = None
    options: dict[str, Any] | None = None


class ExtractRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Body of `POST /v1/extract/{model}`."""

    items: list[Item]
    params: ExtractParams | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """`/v1/tokenize/{model}`: the model's own tokens for each text (exact counts for chunkers)."""

    texts: list[str]
    add_special_tokens: bool = True


class DecodeRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """`/v1/decode/{model}`: token ids back to text with the model's tokenizer."""

    ids: list[list[int]]
    skip_special_tokens: bool = True


class Entity(msgspec.Struct, kw_only=True):
    """A span found in an item's text; `text[start:end] == entity.text`."""

    text: str
    label: str
    score: float
    start: int | None = None
    end: int | None = None
    bbox: list[float] | None = None


class Relation(msgspec.Struct, kw_only=True):
    """A typed relation between two entities."""

    head: str
    tail: str
    relation: str
    score: float


class Classification(msgspec.Struct, kw_only=True):
    """One label with its probability."""

    label: str
    score: float


class DetectedObject(msgspec.Struct, kw_only=True):
    """An object found in an image."""

    label: str
    score: float
    bbox: list[float]


class AddModelRequest(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Body of `POST /admin/models` (and one entry of the server's `--model-store` file): a model registered at
    runtime, a bundle id, a hub id or a local folder, as `-m` takes; it loads on first use, or at once with `load`."""

    model: str
    adapter: str | None = None  # the adapter family, when the model's files do not say it (as `--adapter`)
    served_model_name: str | None = None  # the name it answers under (as `--served-model-name`)
    # Its default profile's options, over what the bundle or its files say (a model config's `adapter_options`).
    loadtime: dict[str, Any] = {}
    runtime: dict[str, Any] = {}
    max_batch_tokens: int | None = None
    compute_precision: str | None = None
    load: bool = False

    @property
    def name(self) -> str:
        """The name it is served and stored under."""
        return self.served_model_name or self.model
