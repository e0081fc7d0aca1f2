"""Every family's `load()` runs its forward before `Ready`: at its configured budget on a GPU (or with the option
`warm_up: budget`), so an out-of-memory shows at start rather than under traffic; small on the CPU, except dense.
Observed from the model's own embedding (and patch) layers as load() calls them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from sie_worker.adapters.torch_common import MICRO_BATCH_ITEMS
from tests import tiny_extract_models

BUDGET = 1024  # max_batch_tokens: small, so the expected row counts show that the budget is what sets them
AT_BUDGET = {"warm_up": "budget"}  # what a GPU does by default, asked for on the CPU


@pytest.fixture
def forward_shapes() -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    """(layer kind, input shape) of every token-embedding and image-patch call made while the fixture is active."""
    seen: list[tuple[str, tuple[int, ...]]] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            if isinstance(module, torch.nn.Embedding) and args[0].ndim == 2:
                seen.append(("tokens", tuple(args[0].shape)))
            elif isinstance(module, torch.nn.Conv2d):
                seen.append(("pixels", tuple(args[0].shape)))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    yield seen
    handle.remove()


def rows_for(max_length: int, cap: int = MICRO_BATCH_ITEMS) -> int:
    return max(1, min(cap, BUDGET // max_length))


@pytest.fixture(scope="module")
def extract_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("warm")

    def build(name: str) -> Path:
        folder = root / name
        if not folder.exists():
            if name == "gliner":
                return tiny_extract_models.build_gliner(folder, build("bert"))
            getattr(tiny_extract_models, f"build_{name}")(folder)
        return folder

    return build


TEXT_FAMILIES = [
    ("dense", "bert", MICRO_BATCH_ITEMS),
    ("sparse", "mlm_dir", MICRO_BATCH_ITEMS),
    ("multivector", "colbert_pylate_dir", MICRO_BATCH_ITEMS),
    ("hybrid", "bge_m3_dir", MICRO_BATCH_ITEMS),
    ("cross_encoder", "cross_encoder_dir", MICRO_BATCH_ITEMS),
    ("classifier", "sentiment", BUDGET),  # runs chunks of max_batch_tokens tokens, with no cap on rows
    ("ner", "ner", BUDGET),  # runs a router batch in one forward
]


def folder_of(weights: str, extract_dir, request: pytest.FixtureRequest) -> Path:  # type: ignore[no-untyped-def]
    return Path(request.getfixturevalue(weights) if weights.endswith("_dir") else extract_dir(weights))


@pytest.mark.parametrize(("family", "weights", "cap"), TEXT_FAMILIES)
def test_text_families_warm_up_at_their_budget(family: str, weights: str, cap: int, make_adapter, extract_dir,  # type: ignore[no-untyped-def]
                                               forward_shapes, request: pytest.FixtureRequest) -> None:
    adapter = make_adapter(family, folder_of(weights, extract_dir, request), max_batch_tokens=BUDGET,
                           options=AT_BUDGET)
    length = adapter.max_length
    assert ("tokens", (rows_for(length, cap), length)) in forward_shapes  # the largest batch it will run
    assert any(kind == "tokens" and shape[0] == 1 for kind, shape in forward_shapes)  # then a small one


@pytest.mark.parametrize(("family", "weights", "cap"), TEXT_FAMILIES)
def test_on_the_cpu_only_dense_warms_up_at_its_budget(family: str, weights: str, cap: int, make_adapter,  # type: ignore[no-untyped-def]
                                                     extract_dir, forward_shapes,
                                                     request: pytest.FixtureRequest) -> None:
    """A budget forward of a large model takes minutes on a few cores; dense encoders take it in a second."""
    adapter = make_adapter(family, folder_of(weights, extract_dir, request), max_batch_tokens=BUDGET)
    length = adapter.max_length
    assert (("tokens", (rows_for(length, cap), length)) in forward_shapes) == (family == "dense")
    assert ("tokens", (1, 8)) in forward_shapes  # the small warm-up runs everywhere


def test_clip_warms_up_both_towers(make_adapter, extract_dir, forward_shapes) -> None:  # type: ignore[no-untyped-def]
    adapter = make_adapter("clip", extract_dir("clip"), max_batch_tokens=BUDGET, options=AT_BUDGET)
    assert ("tokens", (rows_for(adapter.max_length), adapter.max_length)) in forward_shapes
    assert ("pixels", (MICRO_BATCH_ITEMS, 3, 32, 32)) in forward_shapes


def test_gliner_warms_up_on_texts_of_its_full_length(make_adapter, extract_dir, forward_shapes) -> None:  # type: ignore[no-untyped-def]
    make_adapter("gliner", extract_dir("gliner"), max_batch_tokens=BUDGET, options=AT_BUDGET)
    words = 64  # the tiny model's max_len
    assert any(kind == "tokens" and shape[0] == rows_for(words) and shape[1] >= words
               for kind, shape in forward_shapes), forward_shapes
