"""When will a model's worker need its next batch? (router process)

The batcher sends a batch while another runs so that the worker never waits, but a batch sent too early is small:
under steady load it takes only the requests that arrived since the last one left, and the rest wait a whole batch
for the one after. The pacer learns how long the worker's model takes for a batch of a given cost (a fixed part per
batch plus a part per unit of cost; the worker reports its own busy time, so a cold load or a queue in front of the
worker never skews it) and predicts when the worker will be done with what it has; the batcher sends the next batch
one tokenising time before that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

_SMOOTHING = 0.2  # weight of the newest tokenising time in its moving average
_SAFETY_S = 0.001  # extra lead for the hop to the worker and scheduling jitter


@dataclass(frozen=True)
class BatchReport:
    """What running one batch gave: an output per item, and the worker's own timing of it when it has one."""

    outputs: list
    busy_s: float | None = None  # the model's time on this batch (the worker's main thread)
    prepare_s: float = 0.0  # tokenising, done on the worker's other thread while the batch before it runs


@dataclass
class BusyTimeFit:
    """busy seconds ~ fixed + per_cost x cost, by least squares over recent batches (older ones weigh less).

    The fixed part matters: a forward call has an overhead that a lone request pays in full, so a cost-only rate
    learned on big batches would expect small ones to finish far sooner than they do.
    """

    forget: float = 0.05
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def reset(self) -> None:
        """Forget every batch: a new worker process learns its own pace."""
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def add(self, cost: float, busy_s: float) -> None:
        keep = 1.0 - self.forget
        self._w, self._x, self._y = self._w * keep + 1, self._x * keep + cost, self._y * keep + busy_s
        self._xx, self._xy = self._xx * keep + cost * cost, self._xy * keep + cost * busy_s

    def predict(self, cost: float) -> float | None:
        if self._w == 0:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        variance = self._xx / self._w - mean_x * mean_x
        if variance > (0.05 * mean_x) ** 2:
            per_cost = (self._xy / self._w - mean_x * mean_y) / variance
            fixed = mean_y - per_cost * mean_x
            if per_cost >= 0 and fixed >= 0:
                return fixed + per_cost * cost
        return mean_y / mean_x * cost if mean_x > 0 else mean_y  # too little spread to fit: a plain rate


@dataclass(eq=False)
class Sent:
    """A batch the worker has been given and has not finished: when it left, and its cost."""

    at: float
    cost: int


@dataclass
class Pacer:
    """One model's worker as the batcher sees it: the batches it has been sent, and how fast it gets through them.

    `fit` is the model's one pace model: the pool reads the same object for its batch deadlines."""

    fit: BusyTimeFit = field(default_factory=BusyTimeFit)
    prepare_s: float | None = None
    _outstanding: list[Sent] = field(default_factory=list)
    _last_done: float = 0.0

    def sent(self, cost: int) -> Sent:
        sent = Sent(time.perf_counter(), cost)
        self._outstanding.append(sent)
        return sent

    def done(self, sent: Sent, report: BatchReport | None) -> None:
        """Forget the batch; learn from it when the worker timed it (a failed or split batch teaches nothing)."""
        self._outstanding.remove(sent)
        cost = sent.cost
        self._last_done = time.perf_counter()
        if report is None or report.busy_s is None or cost <= 0:
            return
        self.fit.add(cost, report.busy_s)
        self.prepare_s = report.prepare_s if self.prepare_s is None else (
            self.prepare_s + _SMOOTHING * (report.prepare_s - self.prepare_s))

    def send_by(self) -> float | None:
        """The perf_counter time by which the next batch should leave; None when the worker's pace is unknown."""
        if not self._outstanding:
            return time.perf_counter()
        free_at = self._last_done  # the worker runs one batch at a time, in the order they were sent
        for sent in self._outstanding:
            busy = self.fit.predict(sent.cost)
            if busy is None:
                return None
            free_at = max(free_at, sent.at) + busy
        return free_at - (self.prepare_s or 0.0) - _SAFETY_S
