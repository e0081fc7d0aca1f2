"""The typed pipeline's values: batch keys, frozen options, array outputs sliced per entry and joined back in order."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sie_router import request_labels
from sie_router.models.config import ModelConfig, Profile
from sie_router.models.registry import Registry
from sie_router.pipeline.jobs import BatchKey, Encoded, Ragged, Scored, freeze, thaw
from sie_router.pool.batcher import Batcher, BatchLimits
from sie_router.pool.pacing import BatchReport


def _encoded(values: list[int]) -> Encoded:
    """Item v: dense row [v, v], v sparse entries of value v, token count v."""
    offsets = np.concatenate([[0], np.cumsum(values)]).astype(np.int64)
    indices = np.concatenate([np.arange(v) for v in values]).astype(np.int32)
    weights = np.concatenate([np.full(v, float(v)) for v in values]).astype(np.float32)
    return Encoded(np.array(values), np.array([[v, v] for v in values], np.float32),
                   Ragged((indices, weights), offsets))


def _check(out: Encoded, values: list[int]) -> None:
    assert out.tokens.tolist() == values
    assert out.dense is not None and out.dense[:, 0].tolist() == values
    assert out.sparse is not None
    for i, v in enumerate(values):
        indices, weights = out.sparse.row(i)
        assert indices.tolist() == list(range(v)) and weights.tolist() == [float(v)] * v


def test_slices_are_views_of_the_batch_and_rebase_their_offsets() -> None:
    whole = _encoded([1, 3, 2, 4])
    part = whole[1:3]
    _check(part, [3, 2])
    assert part.dense is not None and np.shares_memory(part.dense, whole.dense)  # a slice, not a copy per row


def test_join_puts_entries_back_in_request_order() -> None:
    # The batcher cuts a request in cost order: outputs k went to request position order[k].
    order = [2, 0, 3, 1]
    parts = [_encoded([30, 10]), _encoded([40, 20])]
    _check(Encoded.join(parts, order), [10, 20, 30, 40])
    scored = Scored.join([Scored(np.array([0.3, 0.1]), np.array([3.0, 1.0]), np.array([3, 1])),
                          Scored(np.array([0.4, 0.2]), np.array([4.0, 2.0]), np.array([4, 2]))], order)
    assert scored.scores.tolist() == [0.1, 0.2, 0.3, 0.4] and scored.tokens.tolist() == [1, 2, 3, 4]


async def test_the_batcher_returns_array_outputs_in_order_across_entries() -> None:
    async def run(key: object, items: list[int]) -> BatchReport:
        return BatchReport(_encoded(items), busy_s=0.0)

    batcher = Batcher("m", run, BatchLimits(max_items=2))
    batcher.start()
    try:
        values = [5, 1, 4, 2, 3]
        out = await batcher.submit(BatchKey("encode"), values, costs=values)
        _check(out, values)
    finally:
        await batcher.close()


def test_batch_keys_are_hashable_and_options_round_trip() -> None:
    options = {"pooling": "cls", "nested": {"b": [1, 2], "a": None}}
    key = BatchKey("encode", ("dense",), options=freeze(options))
    same = BatchKey("encode", ("dense",), options=freeze({"nested": {"a": None, "b": [1, 2]}, "pooling": "cls"}))
    assert key == same and hash(key) == hash(same) and len({key, same}) == 1
    assert key != BatchKey("encode", ("dense",), is_query=True, options=freeze(options))
    assert thaw(key.options) == options
    with pytest.raises(AttributeError):
        key.op = "score"  # type: ignore[misc]


async def test_lookup_in_a_task_leaves_the_first_requests_labels_alone() -> None:
    # The batcher task is created inside the first request's context; a lookup it makes must not label that request.
    registry = Registry([ModelConfig(sie_id="a", hf_id="a", profiles={"default": Profile(adapter="dense")}),
                         ModelConfig(sie_id="b", hf_id="b", profiles={"default": Profile(adapter="dense")})])
    labels: dict[str, str] = {"model": "a"}
    token = request_labels.current.set(labels)
    try:
        async def batcher_task() -> str:  # created in the request's context, as the batcher's task is
            return registry.lookup("b")[0].sie_id

        assert await asyncio.create_task(batcher_task()) == "b"
    finally:
        request_labels.current.reset(token)
    assert labels == {"model": "a"}


def test_a_templated_side_asks_the_worker_for_no_checkpoint_prompt_on_top() -> None:
    """A profile's template is the model config's own formatting: the job tells a dense worker to put none of the
    checkpoint's prompts before it (a `query` prompt as well as a `query_template` would prefix twice), unless the
    request names a prompt."""
    from sie_router.pipeline.inputs import encode_job
    from sie_router.pipeline.jobs import Resolved
    from sie_worker.protocol import InputItem

    config = ModelConfig(sie_id="m", hf_id="m", profiles={"default": Profile(adapter="dense")})
    model, items = Resolved(name="m", config=config), [InputItem(text="berlin")]
    runtime = {"query_template": "query: {text}"}
    job = encode_job(model, items, ["dense"], runtime=runtime, options={}, is_query=True)
    assert job.items[0].text == "query: berlin" and thaw(job.key.options) == {"prompt": ""}
    assert thaw(encode_job(model, items, ["dense"], runtime=runtime, options={}).key.options) == {}
    named = encode_job(model, items, ["dense"], runtime=runtime, options={"prompt_name": "q"}, is_query=True)
    assert thaw(named.key.options) == {"prompt_name": "q"}
