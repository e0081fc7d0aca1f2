"""graph_runtime.Lanes' order of calls between batches, on a runtime that records its calls (the real runtimes' own
tests are in test_dense_lean.py and test_lean_families.py): a batch of several calls starts behind the batch before
it on any freed lane, while a lone row runs on every thread only on idle lanes, and never beside another batch's
calls."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sie_worker.adapters.graph_runtime import Lanes

WAIT_S = 60.0  # generous: only a broken order ever waits this long
# How long a call that must not begin is given to begin anyway. Correct code never begins it, so the test never
# depends on this window; it only bounds how long a wrong order takes to show.
MUST_NOT_BEGIN_S = 0.5


class RecordingRuntime:
    """Two lanes and a lone-row model whose calls return their feed's ids, record when they begin and end, and can be
    held at their start until released."""

    lanes = 2

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, int] = {"lane": 0, "alone": 0}
        self.overlaps: list[str] = []
        self.began: dict[int, threading.Event] = {}
        self.release: dict[int, threading.Event] = {}

    def hold(self, tag: int) -> None:
        self.began[tag], self.release[tag] = threading.Event(), threading.Event()

    def _call(self, kind: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        tag = int(feed["input_ids"][0, 0])
        other = "alone" if kind == "lane" else "lane"
        with self.lock:
            self.running[kind] += 1
            if self.running[other]:
                self.overlaps.append(f"{kind} call {tag} began beside a running {other} call")
        if tag in self.began:
            self.began[tag].set()
            assert self.release[tag].wait(WAIT_S)
        with self.lock:
            self.running[kind] -= 1
        return feed["input_ids"].copy()

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self._call("lane", feed)

    def run_alone(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self._call("alone", feed)

    def describe(self) -> str:
        return "recording"

    def computes(self) -> str:
        return "ids"


def feed(tag: int, rows: int = 1) -> dict[str, np.ndarray]:
    return {"input_ids": np.full((rows, 4), tag, np.int64)}


@pytest.fixture
def runtime_and_lanes():
    runtime = RecordingRuntime()
    lanes = Lanes(runtime)  # type: ignore[arg-type]
    yield runtime, lanes
    for release in runtime.release.values():
        release.set()
    lanes.close()


def test_a_lone_row_behind_busy_lanes_runs_as_one_more_lane_call(
        runtime_and_lanes: tuple[RecordingRuntime, Lanes]) -> None:
    """Started early, behind a batch still running, a lone row takes the next free lane (one stream's threads) rather
    than its own model's threads, which the running calls would share."""
    runtime, lanes = runtime_and_lanes
    runtime.hold(1)  # the first batch's longest call
    runtime.hold(3)  # the lone row
    first = lanes.start([feed(1, 2), feed(2)])
    assert runtime.began[1].wait(WAIT_S)
    lone = lanes.start([feed(3)])  # as the worker's prepare thread does, while the first batch runs
    assert runtime.began[3].wait(WAIT_S), "the lone row began on the lane the first batch freed"
    with runtime.lock:
        assert runtime.running == {"lane": 2, "alone": 0}, "on a lane, not on the lone-row model"
    runtime.release[1].set()
    runtime.release[3].set()
    assert [out[0, 0] for out in first()] == [1, 2] and [out[0, 0] for out in lone()] == [3]
    assert runtime.overlaps == []


def test_a_lone_row_on_idle_lanes_runs_on_every_thread_and_the_next_batch_waits_for_it(
        runtime_and_lanes: tuple[RecordingRuntime, Lanes]) -> None:
    runtime, lanes = runtime_and_lanes
    runtime.hold(3)  # the lone row
    runtime.hold(4)  # the next batch's longest call
    lone = lanes.start([feed(3)])
    assert runtime.began[3].wait(WAIT_S), "the lone row began at once, nothing being before it"
    with runtime.lock:
        assert runtime.running == {"lane": 0, "alone": 1}, "on the lone-row model"
    after = lanes.start([feed(4, 2), feed(5)])  # started early, while the lone row runs
    assert not runtime.began[4].wait(MUST_NOT_BEGIN_S), "the next batch began beside the lone row"
    runtime.release[3].set()
    assert [out[0, 0] for out in lone()] == [3]
    assert runtime.began[4].wait(WAIT_S)
    runtime.release[4].set()
    assert [out[0, 0] for out in after()] == [4, 5]
    assert runtime.overlaps == []


def test_batches_of_several_calls_still_start_behind_each_other_on_freed_lanes(
        runtime_and_lanes: tuple[RecordingRuntime, Lanes]) -> None:
    runtime, lanes = runtime_and_lanes
    runtime.hold(1)
    runtime.hold(3)
    first = lanes.start([feed(1, 2), feed(2)])
    second = lanes.start([feed(3, 2), feed(4)])
    assert runtime.began[3].wait(WAIT_S), "the second batch's longest call began on the lane the first freed"
    runtime.release[1].set()
    runtime.release[3].set()
    assert [out[0, 0] for out in first()] == [1, 2] and [out[0, 0] for out in second()] == [3, 4]


def test_a_lone_row_after_a_failed_call_still_runs(runtime_and_lanes: tuple[RecordingRuntime, Lanes]) -> None:
    runtime, lanes = runtime_and_lanes
    run = runtime.run

    def failing(f: dict[str, np.ndarray]) -> np.ndarray:
        if int(f["input_ids"][0, 0]) == 1:
            raise RuntimeError("a call that fails")
        return run(f)

    runtime.run = failing  # type: ignore[method-assign]
    first = lanes.start([feed(1, 2), feed(2)])
    lone = lanes.start([feed(3)])
    with pytest.raises(RuntimeError, match="a call that fails"):
        first()
    assert [out[0, 0] for out in lone()] == [3]


def test_lanes_are_idle_only_when_no_started_call_is_unfinished(
        runtime_and_lanes: tuple[RecordingRuntime, Lanes]) -> None:
    """What the worker's tokenizer reads to take every thread (graph_runtime.Lanes.idle, lean_engine.tokenize_parts):
    a queued or running lane call, or a lone row on its own model, keeps the lanes busy."""
    runtime, lanes = runtime_and_lanes
    assert lanes.idle
    runtime.hold(1)
    batch = lanes.start([feed(1), feed(2), feed(3)])
    assert runtime.began[1].wait(WAIT_S)
    assert not lanes.idle
    runtime.release[1].set()
    assert [out[0, 0] for out in batch()] == [1, 2, 3]
    assert lanes.idle
    runtime.hold(4)
    lone = lanes.start([feed(4)])
    assert runtime.began[4].wait(WAIT_S)
    assert not lanes.idle, "a lone row on every thread"
    runtime.release[4].set()
    assert [out[0, 0] for out in lone()] == [4]
    assert lanes.idle
