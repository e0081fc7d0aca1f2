"""`TokenizeBatch` and `DecodeBatch` (worker process): the model's own tokenizer, no forward pass.

Answered on the prepare thread, beside the next batch's tokenising, and sent in order after the forward pass in hand.
"""

from __future__ import annotations

from typing import Any

from sie_worker.adapters.base import BadInput
from sie_worker.protocol import DecodeBatch, Token, TokenizeBatch, TokenizeResult


def tokenizer_of(adapter: Any) -> Any:
    """The adapter's tokenizer: its own (torch adapters, lean dense), or its graph session's (the lean families)."""
    tokenizer = getattr(adapter, "tokenizer", None) or getattr(getattr(adapter, "session", None), "tokenizer", None)
    if tokenizer is None:
        raise BadInput("this model has no text tokenizer")
    return tokenizer


def _tokens(tokenizer: Any, text: str, add_special_tokens: bool) -> list[Token]:
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                        return_special_tokens_mask=True, truncation=False)
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    tokens = []
    for token_id, piece, special, (start, stop) in zip(encoded["input_ids"], pieces, encoded["special_tokens_mask"],
                                                       encoded["offset_mapping"], strict=True):
        if special:
            tokens.append(Token(int(token_id), piece, True, None, None))
        else:  # offsets as TEI gives them: bytes of the UTF-8 text
            tokens.append(Token(int(token_id), text[start:stop], False, len(text[:start].encode()),
                                len(text[:stop].encode())))
    return tokens


def answer(adapter: Any, batch: TokenizeBatch | DecodeBatch) -> TokenizeResult:
    tokenizer = tokenizer_of(adapter)
    if isinstance(batch, TokenizeBatch):
        if getattr(tokenizer, "is_fast", None) is False:  # offsets need the Rust tokenizer; a slow one raises on them
            raise BadInput("this model's tokenizer is a slow (Python) one, which cannot give token offsets")
        tokens = [_tokens(tokenizer, text, batch.add_special_tokens) for text in batch.texts]
        return TokenizeResult(token_counts=[len(t) for t in tokens], tokens=tokens)
    vocab = len(tokenizer)
    bad = next((i for ids in batch.ids for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise BadInput(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
    texts = [tokenizer.decode(ids, skip_special_tokens=batch.skip_special_tokens) for ids in batch.ids]
    return TokenizeResult(token_counts=[len(ids) for ids in batch.ids], texts=texts)
