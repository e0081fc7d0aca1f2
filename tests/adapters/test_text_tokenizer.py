"""The lean workers' tokenizer split over threads and without offsets gives the encodings the Rust tokenizer gives in
one call, in order (texts and pairs, truncated from either side), and splits only while the lanes are idle."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from tokenizers import Encoding, Tokenizer

from sie_worker.adapters.lean_engine import SPLIT_TOKENIZE_ITEMS, tokenize_parts
from sie_worker.adapters.text_tokenizer import TextTokenizer
from tests.adapters.conftest import ThreadNames
from tests.sentences import SENTENCES


def reference(path: Path, inputs: list, max_length: int, side: str) -> list[Encoding]:
    backend = Tokenizer.from_file(str(path))
    backend.no_padding()
    backend.enable_truncation(max_length, strategy="longest_first", direction=side)
    return backend.encode_batch(inputs)


def same(mine: list[Encoding], theirs: list[Encoding]) -> None:
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs, strict=True):
        assert (a.ids, a.type_ids, a.attention_mask, a.special_tokens_mask) == (
            b.ids, b.type_ids, b.attention_mask, b.special_tokens_mask)


@pytest.mark.parametrize("side", ["right", "left"])
def test_split_over_threads_and_without_offsets_the_encodings_are_the_rust_tokenizers(minilm_dir: Path,
                                                                                      side: str) -> None:
    path = minilm_dir / "tokenizer.json"
    earlier = set(threading.enumerate())
    tokenizer = TextTokenizer(path, clean_up_tokenization_spaces=True, threads=3)
    texts = [f"{sentence} {'word ' * (i % 40)}" for i, sentence in enumerate(SENTENCES * 3)][:61]  # not a multiple of 3
    pairs = list(zip(texts, reversed(texts), strict=True))
    for parts in (1, 2, 3, 7):  # 7: no more than the tokenizer's threads
        for offsets in (True, False):
            texts_out = tokenizer.encode_batch(texts, 24, side, offsets=offsets, parts=parts)
            same(texts_out, reference(path, texts, 24, side))
            same(tokenizer.encode_pairs(pairs, 24, side, offsets=offsets, parts=parts),
                 reference(path, pairs, 24, side))
            if offsets:
                assert texts_out[5].offsets == reference(path, texts, 24, side)[5].offsets
            else:
                assert set(texts_out[5].offsets) == {(0, 0)}, "encode_batch_fast: no offsets computed"
    assert tokenizer.encode_batch(texts[:2], None, parts=3)[1].ids == reference(path, texts[:2], 512, side)[1].ids
    spy = ThreadNames(tokenizer.backend)
    tokenizer.backend = spy
    same(tokenizer.encode_batch(texts, 24, offsets=False, parts=3), reference(path, texts, 24, "right"))
    # The caller runs one part and the helpers the others; one helper may take two parts when the other is not free.
    assert len(spy.names) >= 2 and threading.current_thread().name in spy.names, "the caller and its helpers"
    tokenizer.close()
    assert not set(threading.enumerate()) - earlier, "close() ends the helpers"


def test_a_batch_is_split_over_threads_only_while_the_lanes_are_idle() -> None:
    assert tokenize_parts(256, threads=2, lanes_idle=True) == 2
    assert tokenize_parts(256, threads=2, lanes_idle=False) == 1, "beside running calls, one thread"
    assert tokenize_parts(2 * SPLIT_TOKENIZE_ITEMS - 1, threads=2, lanes_idle=True) == 1, "too few to split"
    assert tokenize_parts(3 * SPLIT_TOKENIZE_ITEMS, threads=16, lanes_idle=True) == 3
    assert tokenize_parts(0, threads=2, lanes_idle=True) == 1
