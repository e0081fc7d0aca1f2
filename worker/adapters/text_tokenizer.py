"""A bare `tokenizers.Tokenizer` for the lean workers (worker process, free of transformers): batch encoding for the
forward pass, and the few calls of a transformers tokenizer that `sie_worker.tokens` (TEI's tokenize and decode)
makes, with transformers' results.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
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

    def __init__(self, path: Path, clean_up_tokenization_spaces: bool, lowercase: bool = False,
                 threads: int = 1) -> None:
        self.backend = Tokenizer.from_file(str(path))
        self.backend.no_padding()  # the adapter pads each length bucket itself
        if lowercase:
            lowercase_first(self.backend)
        self.clean_up = clean_up_tokenization_spaces
        self.threads = max(1, threads)  # the most `parts` of one call
        self._helpers: ThreadPoolExecutor | None = None  # the threads of `parts` > 1, made on first use

    def encode_batch(self, texts: list[str], max_length: int | None, side: str = "right", offsets: bool = True,
                     parts: int = 1) -> list[Encoding]:
        """Special tokens added; cut to `max_length` tokens (them included) from `side`, or not cut when None.
        Without `offsets` the encodings carry no character offsets (`_encode`); `parts` > 1 splits the work over
        that many threads (at most `threads`)."""
        if max_length is None:
            self.backend.no_truncation()
        else:
            self.backend.enable_truncation(max_length, direction=side)
        return self._encode(texts, offsets, parts)

    def encode_pairs(self, pairs: list[tuple[str, str]], max_length: int | None, side: str = "right",
                     offsets: bool = True, parts: int = 1) -> list[Encoding]:
        """(text, text) pairs with special tokens and token types, cut to `max_length` tokens longest first (a token at
        a time from the longer of the two), as transformers' `truncation=True` asks of this same Rust tokenizer.
        `offsets` and `parts` as in `encode_batch`."""
        if max_length is None:
            self.backend.no_truncation()
        else:
            self.backend.enable_truncation(max_length, strategy="longest_first", direction=side)
        return self._encode(pairs, offsets, parts)

    def _encode(self, inputs: list[Any], offsets: bool, parts: int) -> list[Encoding]:
        """The inputs encoded in `parts` contiguous slices, the first on this thread and each other on a helper; the
        Rust tokenizer lets go of the GIL while it encodes, so the slices run side by side. A CPU worker turns the
        tokenizer's own thread pool off (sie_worker.options.CPU_WORKER_ENV) unless its operator turns it on; then the
        pool splits each slice again. Every helper is done before this returns or raises: the next call may change
        the shared tokenizer's truncation.

        Without offsets, `encode_batch_fast`: the same ids, token types and masks for a fifth less work (15.3 against
        19.7 ms for 256 corpus sentences on one thread; bench/README.md, "tokens beside the forward")."""
        encode = self.backend.encode_batch if offsets else self.backend.encode_batch_fast
        parts = max(1, min(parts, self.threads, len(inputs)))
        if parts == 1:
            return encode(inputs)
        if self._helpers is None:
            self._helpers = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="sie-tokenize")
        bounds = [len(inputs) * part // parts for part in range(parts + 1)]
        others = [self._helpers.submit(encode, inputs[bounds[part]:bounds[part + 1]]) for part in range(1, parts)]
        try:
            first = encode(inputs[:bounds[1]])
        finally:
            wait(others)
        return first + [encoding for other in others for encoding in other.result()]

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown(wait=True)
        self._helpers = None

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
