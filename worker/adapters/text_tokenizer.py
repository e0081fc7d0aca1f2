"""A bare `tokenizers.Tokenizer` for the lean workers (worker process, free of transformers): batch encoding for the
forward pass, and the few calls of a transformers tokenizer that `sie_worker.tokens` (TEI's tokenize and decode)
makes, with transformers' results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Encoding, Tokenizer, normalizers

# transformers' `clean_up_tokenization`, applied on decode when the checkpoint's tokenizer config asks for it.
_CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
              (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def lowercase_first(backend: Tokenizer) -> None:
    """sentence-transformers' `do_lower_case`: a Lowercase normalizer before the tokenizer's own, unless it has one."""
    normalizer = backend.normalizer
    own = list(normalizer) if isinstance(normalizer, normalizers.Sequence) else [normalizer]
    if not any(isinstance(n, normalizers.Lowercase) for n in own):
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *(n for n in own if n is not None)])


class TextTokenizer:
    is_fast = True  # offsets come from the Rust tokenizer

    def __init__(self, path: Path, clean_up_tokenization_spaces: bool, lowercase: bool = False) -> None:
        self.backend = Tokenizer.from_file(str(path))
        self.backend.no_padding()  # the adapter pads each length bucket itself
        if lowercase:
            lowercase_first(self.backend)
        self.clean_up = clean_up_tokenization_spaces

    def encode_batch(self, texts: list[str], max_length: int | None, side: str = "right") -> list[Encoding]:
        """Special tokens added; cut to `max_length` tokens (them included) from `side`, or not cut when None."""
        if max_length is None:
            self.backend.no_truncation()
        else:
            self.backend.enable_truncation(max_length, direction=side)
        return self.backend.encode_batch(texts)

    def encode_pairs(self, pairs: list[tuple[str, str]], max_length: int | None, side: str = "right") -> list[Encoding]:
        """(text, text) pairs with special tokens and token types, cut to `max_length` tokens longest first (a token at
        a time from the longer of the two), as transformers' `truncation=True` asks of this same Rust tokenizer."""
        if max_length is None:
            self.backend.no_truncation()
        else:
            self.backend.enable_truncation(max_length, strategy="longest_first", direction=side)
        return self.backend.encode_batch(pairs)

    def prompt_length(self, prompt: str) -> int:
        """The prompt's tokens as sentence-transformers counts them: special tokens included but a trailing one."""
        self.backend.no_truncation()
        encoding = self.backend.encode(prompt)
        return len(encoding.ids) - (1 if encoding.special_tokens_mask[-1:] == [1] else 0)

    def __len__(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[Any]]:
        """One text untruncated, with its offsets and special-token mask (what `tokens.answer` reads)."""
        self.backend.no_truncation()
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": encoding.ids, "offset_mapping": encoding.offsets,
                "special_tokens_mask": encoding.special_tokens_mask}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(i) or "" for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up:
            for before, after in _CLEAN_UPS:
                text = text.replace(before, after)
        return text
