"""When will a model's worker need its next batch? (router process)

The batcher sends a batch while another runs so that the worker never waits, but a batch sent too early is small:
under steady load it takes only the requests that arrived since the last one left, and the rest wait a whole batch
for the one after. The pacer learns how long the worker's model takes per unit of batch cost (the worker reports its
own busy time, so a cold load or a queue in front of the worker never skews it) and predicts when the worker will be
done with what it has; the batcher sends the next batch one tokenising time before that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

_SMOOTHING = 0.2  # weight of the newest sample in the moving averages
_SAFETY_S = 0.001  # extra lead for the hop to the worker and scheduling jitter


@dataclass(frozen=True)
class BatchReport:
    """What running one batch gave: an output per item, and the worker's own timing of it when it has one."""

    outputs: list
    busy_s: float | None = None  # the model's time on this batch (the worker's main thread)
    prepare_s: float = 0.0  # tokenising, done on the worker's other thread while the batch before it runs


@dataclass
class Pacer:
    seconds_per_cost: float | None = None
    prepare_s: float = 0.0
    _outstanding: dict[int, tuple[float, int]] = field(default_factory=dict)  # id -> (sent at, cost)
    _last_done: float = 0.0

    def sent(self, batch_id: int, cost: int) -> None:
        self._outstanding[batch_id] = (time.perf_counter(), cost)

    def done(self, batch_id: int, report: BatchReport | None) -> None:
        """Forget the batch; learn from it when the worker timed it (a failed or split batch teaches nothing)."""
        _, cost = self._outstanding.pop(batch_id, (0.0, 0))
        self._last_done = time.perf_counter()
        if report is None or report.busy_s is None or cost <= 0:
            return
        self.seconds_per_cost = _average(self.seconds_per_cost, report.busy_s / cost)
        self.prepare_s = _average(self.prepare_s or None, report.prepare_s)

    def send_by(self) -> float | None:
        """The perf_counter time by which the next batch should leave; None when the worker's pace is unknown."""
        if not self._outstanding:
            return time.perf_counter()
        if self.seconds_per_cost is None:
            return None
        free_at = self._last_done  # the worker runs one batch at a time, in the order they were sent
        for sent_at, cost in sorted(self._outstanding.values()):
            free_at = max(free_at, sent_at) + cost * self.seconds_per_cost
        return free_at - self.prepare_s - _SAFETY_S


def _average(current: float | None, sample: float) -> float:
    return sample if current is None else current + _SMOOTHING * (sample - current)
