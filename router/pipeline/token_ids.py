"""Token-id input on the embeddings routes (router process): LangChain sends `cl100k_base` ids, we decode them."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sie_router.errors import SIEError
from sie_sdk.codes import ErrorCode

_HINT = ("ids must be cl100k_base token ids; LangChain users can instead set check_embedding_ctx_length=False "
         "to send plain text")


@lru_cache(maxsize=2)
def _encoding(name: str) -> Any:
    # Imported on the first token-id request: importing bpe_openai reads its vocabularies, ~60 MiB the router would
    # otherwise hold for a route most deployments never see.
    import bpe_openai

    return bpe_openai.get_encoding(name)


def decode_token_ids(ids: list[int], encoding: str = "cl100k_base") -> str:
    enc = _encoding(encoding)
    top = enc.max_token_value
    bad = next((i for i in ids if not isinstance(i, int) or isinstance(i, bool) or i < 0 or i > top), None)
    if bad is not None:
        raise SIEError(ErrorCode.INVALID_TOKEN_IDS, f"token id {bad} is outside the {encoding} vocabulary (0..{top}); "
                       f"{_HINT}", param="input")
    return str(enc.decode(ids, errors="replace"))
