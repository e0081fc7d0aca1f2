"""CPU accounting from /proc: the cores used by watched process trees, by this process, and by other tenants.

Copied from ../shared/bench/cpustat.py. foreign cores = (busy - watched trees - self) / (wall * HZ).
"""

from __future__ import annotations

import argparse
import os
import time

HZ = os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, steal) ticks summed over all CPUs; busy = user+nice+system+irq+softirq."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    return v[0] + v[1] + v[2] + v[5] + v[6], v[7]


def _stat(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    ppid = int(rest[1])
    utime, stime = int(rest[11]), int(rest[12])
    return ppid, utime + stime


def tree_ticks(roots: list[int]) -> int:
    """utime+stime of the given pids and all their live descendants."""
    if not roots:
        return 0
    info = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st:
                info[int(d)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in info.items():
        children.setdefault(ppid, []).append(pid)
    seen, stack, total = set(), list(roots), 0
    while stack:
        p = stack.pop()
        if p in seen or p not in info:
            continue
        seen.add(p)
        total += info[p][1]
        stack.extend(children.get(p, []))
    return total


def self_ticks() -> int:
    t = os.times()
    return round((t.user + t.system) * HZ)


class Window:
    """with Window(pids) as w: ...   then w.foreign_cores, w.ours_cores, w.steal_cores"""

    def __init__(self, pids: list[int] | None = None):
        self.pids = [p for p in (pids or []) if p]

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.b0, self.st0 = machine_ticks()
        self.p0 = tree_ticks(self.pids)
        self.s0 = self_ticks()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        b1, st1 = machine_ticks()
        db = b1 - self.b0
        self.steal_cores = (st1 - self.st0) / (dt * HZ) if dt else 0.0
        dp = tree_ticks(self.pids) - self.p0
        ds = self_ticks() - self.s0
        self.seconds = dt
        self.ours_cores = (dp + ds) / (dt * HZ) if dt else 0.0
        self.tree_cores = dp / (dt * HZ) if dt else 0.0   # watched pids (the server)
        self.self_cores = ds / (dt * HZ) if dt else 0.0   # this process (the client / bench)
        self.foreign_cores = max(0.0, (db - dp - ds) / (dt * HZ)) if dt else 0.0
        return False


def foreign_now(pids: list[int] | None = None, seconds: float = 2.0) -> float:
    with Window(pids) as w:
        time.sleep(seconds)
    return w.foreign_cores


def wait_quiet(pids: list[int] | None = None, threshold: float = 0.25,
               max_wait: float = 90.0, window: float = 2.0) -> tuple[float, float]:
    """Wait until other tenants use < threshold cores (2 s windows), at most max_wait s.
    Returns (last foreign cores, seconds waited)."""
    t0 = time.perf_counter()
    while True:
        f = foreign_now(pids, window)
        waited = time.perf_counter() - t0
        if f < threshold or waited >= max_wait:
            return f, waited


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, nargs="*", default=[])
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    print(f"foreign cores over {a.seconds:.0f} s: {foreign_now(a.pid, a.seconds):.2f}")
