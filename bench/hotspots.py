"""Where our server's CPU goes under load: router vs worker CPU split, and py-spy's top functions in each process.

`python bench/hotspots.py [--shape c32] [--seconds 15]`; py-spy is optional (without it only the CPU split is shown).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import psutil

import loadgen
import targets
from corpus import make_corpus

OUT = targets.ROOT / ".cache" / "bench" / "profile"


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def top_functions(collapsed: Path, n: int) -> list[tuple[str, float]]:
    """Share of on-CPU samples whose innermost frame is each function (py-spy's collapsed 'raw' format)."""
    own: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            own[stack.split(";")[-1]] += int(count)
    total = sum(own.values()) or 1
    return [(name, 100.0 * c / total) for name, c in own.most_common(n)]


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    cmd = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200", "--format", "raw",
           "--nonblocking", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="c32", choices=[s.name for s in loadgen.SHAPES])
    p.add_argument("--seconds", type=float, default=15.0, help="length of the profiled window (at most 60)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for our server (repeatable)")
    a = p.parse_args(argv)
    seconds = min(a.seconds, 60.0)
    shape = next(s for s in loadgen.SHAPES if s.name == a.shape)
    corpus = make_corpus(512)
    server = targets.ours(a.threads, a.server_arg)
    ok, why = server.start(240)
    if not ok or server.proc is None:
        print(f"our server did not start: {why}", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        router = psutil.Process(server.proc.pid)
        workers = [c for c in router.children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
        ref = _unchecked_reference(corpus)
        loadgen.warm_up(server.url, server.model, corpus, ref, shape, 3.0)
        procs = {"router": router, **{f"worker {w.pid}": w for w in workers}}
        before = {name: cpu_seconds(proc) for name, proc in procs.items()}
        client0 = os.times()
        spies = {name: record(proc.pid, seconds, OUT / f"{name.replace(' ', '-')}.txt") for name, proc in procs.items()}
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(loadgen.run(server.url, server.model, corpus, ref,
                                                                          shape, seconds)))
        load.start()
        load.join(seconds + 120)
        used = {name: cpu_seconds(proc) - before[name] for name, proc in procs.items()}
        client = os.times()
        used["load generator"] = (client.user + client.system) - (client0.user + client0.system)
        for spy in spies.values():
            if spy is not None:
                spy.wait(60)
    finally:
        server.stop()
    print(f"# {shape.name}: {result.get('sent_per_s', 0):.1f} sentences/s, p50 {result.get('p50_ms', 0):.1f} ms, "
          f"{result.get('errors', 0)} errors; load average {os.getloadavg()}")
    total = sum(v for k, v in used.items() if k != "load generator") or 1.0
    for name, secs in used.items():
        share = f"{100 * secs / total:5.1f}% of the server's CPU" if name != "load generator" else ""
        print(f"{name:<16} {secs / seconds:5.2f} cores  {share}")
    for name in procs:
        path = OUT / f"{name.replace(' ', '-')}.txt"
        if path.exists():
            print(f"\n# {name}: top functions by own on-CPU samples ({path})")
            for fn, pct in top_functions(path, a.top):
                print(f"  {pct:5.1f}%  {fn[:150]}")
    return 0


def _unchecked_reference(corpus: list[str]):
    """No bare model here: a reference of ones makes every cosine check pass trivially, so only shapes are checked."""
    import numpy as np

    return np.ones((len(corpus), 384), dtype=np.float32) / np.sqrt(384)


if __name__ == "__main__":
    sys.exit(main())
