"""`make chaos` (`python bench/chaos.py`): the pool on an operator's bad day, measured against issue 25's targets.

One server (loopback) serves three tiny models of mixed families, each by local path: a lean dense encoder (its
exported graph, no torch), a reranker and a SPLADE (torch). Mixed polite clients honour Retry-After: OpenAI
/v1/embeddings and native msgpack on the dense model, Infinity /rerank and Cohere /v1/rerank on the reranker, native
JSON and TEI /embed_sparse on the SPLADE. After a warm-up and a fault-free baseline, every INTERVAL seconds one random
ready worker gets SIGKILL or SIGSTOP, for MINUTES minutes; then the faults stop, and a prober times how long until
every model answers again. Faults hit serving workers; a fault during a load is the load deadline's (its own tests).

Reports goodput (answers 200 per second) during the chaos against the baseline, every answer that was neither 200
nor a coded refusal (429 or 503 with an error code and Retry-After), the longest request, the seconds from the last
fault to every model serving, router and worker RSS, and processes left stopped or orphaned. Exits 1 when a target is
missed.

    python bench/chaos.py                                   # 10 minutes, a fault every 15 s (make chaos)
    python bench/chaos.py --minutes 0.5 --interval 5 --json .cache/bench/chaos.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import msgspec
import psutil

import targets
from corpus import make_corpus
from loadgen import assert_loopback

DENSE, RERANKER, SPLADE = "chaos/dense", "chaos/reranker", "chaos/splade"
# tests/tiny_models.py's builders, run in a child process so that torch stays out of this one.
BUILDERS = {DENSE: "build_dense_st", RERANKER: "build_cross_encoder", SPLADE: "build_sparse_st"}
BUILD = ("import sys; from pathlib import Path; from tests import tiny_models; "
         "[getattr(tiny_models, b)(Path(p)) for b, p in zip(sys.argv[1::2], sys.argv[2::2])]")
MODEL_DIR = targets.ROOT / ".cache" / "bench" / "chaos-models"
# (client kind, model): assigned to the clients in turn.
KINDS = [("openai", DENSE), ("infinity-rerank", RERANKER), ("native-sparse", SPLADE), ("native-msgpack", DENSE),
         ("cohere-rerank", RERANKER), ("tei-sparse", SPLADE)]
TARGETS = {"uncoded": 0, "longest_s": 90.0, "goodput_ratio": 0.6, "recovery_s": 30.0, "router_rss_ratio": 1.1}
REQUEST_TIMEOUT_S = 120.0
JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}


@dataclass
class Answer:
    """One request as its client saw it."""

    kind: str
    model: str
    started: float
    ended: float
    status: int
    code: str | None
    retry_after: str | None

    @property
    def coded_refusal(self) -> bool:
        return self.status in (429, 503) and bool(self.code) and self.retry_after is not None


@dataclass
class Fault:
    at: float
    model: str
    pid: int
    signal: str


@dataclass
class Run:
    """What happened, on the monotonic clock."""

    answers: list[Answer] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    seen_pids: set[int] = field(default_factory=set)  # the router's descendants seen at any time
    rss: list[dict[str, int]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # phase -> when it began
    recovery: dict[str, float | None] = field(default_factory=dict)


def build_models() -> dict[str, Path]:
    folders = {name: MODEL_DIR / name.split("/")[1] for name in BUILDERS}
    todo = [arg for name, folder in folders.items() if not (folder / "config.json").is_file()
            for arg in (BUILDERS[name], str(folder))]
    if todo:
        subprocess.run([sys.executable, "-c", BUILD, *todo], cwd=targets.ROOT, check=True)
    return folders


def server(folders: dict[str, Path], extra: list[str]) -> targets.Server:
    port = targets.free_port()
    models = [arg for name, folder in folders.items() for arg in ("-m", str(folder), "--served-model-name", name)]
    cmd = [sys.executable, "-m", "sie_router", "serve", *models, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *extra]
    return targets.Server("chaos", cmd, port, "/v1/embeddings", "/readyz", model=DENSE,
                          log_tag=f"-{time.strftime('%Y%m%d-%H%M%S')}")  # each run keeps its server log


def request(kind: str, rnd: random.Random, corpus: list[str]) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of one request of `kind`."""
    texts = [corpus[rnd.randrange(len(corpus))] for _ in range(rnd.randint(1, 8))]
    enc = msgspec.json.encode
    if kind == "openai":
        return "/v1/embeddings", enc({"model": DENSE, "input": texts}), JSON_HEADERS
    if kind == "native-msgpack":
        body = msgspec.msgpack.encode({"items": [{"text": t} for t in texts]})
        return f"/v1/encode/{DENSE}", body, {"content-type": "application/msgpack", "accept": "application/msgpack"}
    if kind in ("infinity-rerank", "cohere-rerank"):
        path = "/rerank" if kind == "infinity-rerank" else "/v1/rerank"
        return path, enc({"model": RERANKER, "query": texts[0], "documents": texts}), JSON_HEADERS
    if kind == "native-sparse":
        body = enc({"items": [{"text": t} for t in texts], "params": {"output_types": ["sparse"]}})
        return f"/v1/encode/{SPLADE}", body, JSON_HEADERS
    assert kind == "tei-sparse"
    return f"/tei/{SPLADE}/embed_sparse", enc({"inputs": texts}), JSON_HEADERS


async def send(session: aiohttp.ClientSession, base: str, kind: str, model: str, rnd: random.Random,
               corpus: list[str]) -> Answer:
    path, body, headers = request(kind, rnd, corpus)
    started = time.monotonic()
    try:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with session.post(base + path, data=body, headers=headers, timeout=timeout) as response:
            await response.read()
            status, code = response.status, response.headers.get("x-sie-error-code")
            retry_after = response.headers.get("retry-after")
    except (TimeoutError, aiohttp.ClientError) as exc:
        status, code, retry_after = 0, f"{type(exc).__name__}: {exc}"[:120], None
    return Answer(kind, model, started, time.monotonic(), status, code, retry_after)


def session_() -> aiohttp.ClientSession:
    # Idle connections are dropped before uvicorn's 5 s keep-alive closes them: reusing one just as the server
    # closes it is a client-side race, not an answer of the server's.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(keepalive_timeout=2.0))


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def client(n: int, base: str, run: Run, stop: asyncio.Event, corpus: list[str]) -> None:
    """One polite client: requests back to back; after a refusal it waits the Retry-After it was given."""
    kind, model = KINDS[n % len(KINDS)]
    rnd = random.Random(n)
    async with session_() as session:
        while not stop.is_set():
            answer = await send(session, base, kind, model, rnd, corpus)
            run.answers.append(answer)
            if answer.status != 200:
                await pause(stop, float(answer.retry_after) if answer.coded_refusal and answer.retry_after else 1.0)


def ready_workers(base: str) -> list[dict]:
    return [row for row in admin_rows(base) if row["state"] == "loaded" and row.get("pid")]


def admin_rows(base: str) -> list[dict]:
    with urllib.request.urlopen(f"{base}/admin/workers", timeout=10) as response:
        return list(json.loads(response.read())["workers"])


async def chaos(base: str, run: Run, seconds: float, interval: float, rnd: random.Random) -> None:
    """Every `interval` seconds, SIGKILL or SIGSTOP one random ready worker, for `seconds`."""
    start = time.monotonic()
    for k in range(1, int(seconds // interval) + 1):
        await asyncio.sleep(max(0.0, start + k * interval - time.monotonic()))
        rows = await asyncio.to_thread(ready_workers, base)
        if not rows:
            print(f"  {time.monotonic() - start:6.1f} s  no ready worker to fault", flush=True)
            continue
        row, sig = rnd.choice(rows), rnd.choice([signal.SIGKILL, signal.SIGSTOP])
        try:
            os.kill(row["pid"], sig)
        except ProcessLookupError:
            continue
        run.faults.append(Fault(time.monotonic(), row["model"], row["pid"], sig.name))
        print(f"  {time.monotonic() - start:6.1f} s  {sig.name} {row['model']} (pid {row['pid']})", flush=True)


async def probe(base: str, run: Run, since: float, limit_s: float) -> None:
    """Seconds from `since` (the last fault) until each model answers 200, probing every 0.2 s, Retry-After aside."""
    corpus = ["probe sentence"]
    kinds = {model: kind for kind, model in KINDS[:3]}
    async with session_() as session:
        async def one(model: str) -> None:
            rnd = random.Random(0)
            while time.monotonic() - since < limit_s:
                answer = await send(session, base, kinds[model], model, rnd, corpus)
                if answer.status == 200:
                    run.recovery[model] = round(answer.ended - since, 2)
                    return
                await asyncio.sleep(0.2)
            run.recovery[model] = None

        await asyncio.gather(*(one(model) for model in BUILDERS))


def sample(router: psutil.Process, run: Run) -> None:
    """The router's RSS and each descendant's, and every pid seen."""
    rss = {"router": router.memory_info().rss}
    for child in router.children(recursive=True):
        run.seen_pids.add(child.pid)
        try:
            rss[f"{child.pid} {' '.join(child.cmdline())[:40]}"] = child.memory_info().rss
        except psutil.Error:
            continue
    run.rss.append(rss)


async def sampler(router: psutil.Process, run: Run, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.to_thread(sample, router, run)
        await pause(stop, 2.0)


async def scenario(base: str, router: psutil.Process, a: argparse.Namespace) -> Run:
    run, stop, corpus = Run(), asyncio.Event(), make_corpus(512)
    tasks = [asyncio.create_task(client(n, base, run, stop, corpus)) for n in range(a.clients)]
    tasks.append(asyncio.create_task(sampler(router, run, stop)))
    await asyncio.sleep(a.warmup)
    run.marks["baseline"] = time.monotonic()
    await asyncio.to_thread(sample, router, run)
    await asyncio.sleep(a.baseline)
    run.marks["chaos"] = time.monotonic()
    print(f"chaos: a fault every {a.interval:g} s for {a.minutes:g} min", flush=True)
    await chaos(base, run, a.minutes * 60, a.interval, random.Random(a.seed))
    run.marks["recovery"] = time.monotonic()
    await probe(base, run, run.faults[-1].at if run.faults else time.monotonic(), a.recovery_limit)
    run.marks["end"] = time.monotonic()
    await asyncio.to_thread(sample, router, run)
    stop.set()
    await asyncio.gather(*tasks)
    return run


def leftovers(run: Run, router_pid: int) -> dict[str, list[str]]:
    """Processes this server started that are stopped, or orphaned: alive with a parent outside the server's tree."""
    found: dict[str, list[str]] = {"stopped": [], "orphaned": []}
    tree = {router_pid, *run.seen_pids}
    for pid in sorted(run.seen_pids):
        try:
            proc = psutil.Process(pid)
            status, parent, name = proc.status(), proc.ppid(), " ".join(proc.cmdline())[:60]
        except psutil.Error:
            continue
        if status == psutil.STATUS_STOPPED:
            found["stopped"].append(f"{pid} {name}")
        elif status != psutil.STATUS_ZOMBIE and parent not in tree:
            found["orphaned"].append(f"{pid} {name}")
    return found


def stop_server(srv: targets.Server, run: Run) -> list[str]:
    """SIGTERM the router alone (it stops its workers), then list what of this server is still alive, and end it."""
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        srv.proc.wait(60)
    alive = []
    for pid in sorted(run.seen_pids):
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(proc.cmdline())[:60]}")
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        except psutil.Error:
            continue
    srv.stop()
    return alive


def between(run: Run, start: str, end: str) -> list[Answer]:
    return [a for a in run.answers if run.marks[start] <= a.ended < run.marks[end]]


def goodput(answers: list[Answer], seconds: float) -> float:
    return sum(a.status == 200 for a in answers) / seconds if seconds > 0 else 0.0


def summarize(run: Run, found: dict[str, list[str]], after_stop: list[str], restarts: dict[str, int]) -> dict:
    base_s = run.marks["chaos"] - run.marks["baseline"]
    chaos_s = run.marks["recovery"] - run.marks["chaos"]
    baseline, during = goodput(between(run, "baseline", "chaos"), base_s), goodput(between(run, "chaos", "recovery"),
                                                                                    chaos_s)
    uncoded = [a for a in run.answers if a.status != 200 and not a.coded_refusal]
    refusals = Counter(f"{a.status} {a.code}" for a in run.answers if a.coded_refusal)
    recovered = list(run.recovery.values())
    router = [r["router"] for r in run.rss]
    workers = {k.split(" ", 1)[1]: v for k, v in run.rss[-1].items() if k != "router"}
    return {
        "baseline": {"seconds": round(base_s, 1), "goodput": round(baseline, 1)},
        "chaos": {"seconds": round(chaos_s, 1), "goodput": round(during, 1), "faults": len(run.faults),
                  "by_signal": dict(Counter(f.signal for f in run.faults)),
                  "by_model": dict(Counter(f.model for f in run.faults))},
        "goodput_ratio": round(during / baseline, 3) if baseline else 0.0,
        "answers": len(run.answers), "ok": sum(a.status == 200 for a in run.answers),
        "refusals": dict(refusals.most_common()),
        "uncoded": {"count": len(uncoded), "first": [asdict(a) for a in uncoded[:20]]},
        "longest_s": round(max((a.ended - a.started for a in run.answers), default=0.0), 2),
        "recovery_s": None if None in recovered or not recovered else max(recovered),
        "recovery_by_model": run.recovery,
        "rss_mib": {"router_start": round(router[0] / 2**20, 1), "router_end": round(router[-1] / 2**20, 1),
                    "router_max": round(max(router) / 2**20, 1),
                    "workers_end": {k: round(v / 2**20, 1) for k, v in workers.items()}},
        "router_rss_ratio": round(router[-1] / router[0], 3),
        "restarts": restarts,
        "leftovers": {**found, "alive_after_stop": after_stop},
    }


def misses(summary: dict) -> list[str]:
    found = []
    if summary["uncoded"]["count"] > TARGETS["uncoded"]:
        found.append(f"{summary['uncoded']['count']} answers neither 200 nor a coded refusal")
    if summary["longest_s"] > TARGETS["longest_s"]:
        found.append(f"a request took {summary['longest_s']} s")
    if summary["goodput_ratio"] < TARGETS["goodput_ratio"]:
        found.append(f"goodput during the chaos {summary['goodput_ratio']}x the baseline")
    if summary["recovery_s"] is None or summary["recovery_s"] > TARGETS["recovery_s"]:
        found.append(f"every model serving {summary['recovery_s']} s after the last fault")
    if any(summary["leftovers"].values()):
        found.append(f"processes left behind: {summary['leftovers']}")
    if summary["router_rss_ratio"] > TARGETS["router_rss_ratio"]:
        found.append(f"router RSS grew {summary['router_rss_ratio']}x")
    return found


def admin_restarts(base: str) -> dict[str, int]:
    return {row["model"]: row.get("restarts", 0) for row in admin_rows(base)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long the faults go on (default 10)")
    p.add_argument("--interval", type=float, default=15.0, help="seconds between faults (default 15)")
    p.add_argument("--clients", type=int, default=6, help="polite clients, spread over the models and APIs")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds of traffic before the baseline")
    p.add_argument("--baseline", type=float, default=60.0, help="seconds of fault-free traffic measured first")
    p.add_argument("--recovery-limit", type=float, default=120.0, help="give up on a model this long after")
    p.add_argument("--seed", type=int, default=25)
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the server (repeatable)")
    p.add_argument("--json", metavar="OUT", help="write the summary here too")
    a = p.parse_args(argv)
    print(f"# command: {' '.join([sys.executable, *sys.argv])}\n# load average: {os.getloadavg()}, "
          f"{os.cpu_count()} CPUs", flush=True)
    srv = server(build_models(), a.server_arg)
    ok, why = srv.start(300)
    if not ok or srv.proc is None:
        print(f"the server did not start: {why}", file=sys.stderr)
        return 1
    base = f"http://127.0.0.1:{srv.port}"
    assert_loopback(base)
    router = psutil.Process(srv.proc.pid)
    try:
        run = asyncio.run(scenario(base, router, a))
        found, restarts = leftovers(run, router.pid), admin_restarts(base)
    except BaseException:
        srv.stop()
        raise
    after_stop = stop_server(srv, run)
    summary = {"command": " ".join(sys.argv), "load_average": os.getloadavg(), "targets": TARGETS,
               **summarize(run, found, after_stop, restarts)}
    summary["misses"] = misses(summary)
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(summary, indent=1))
    for miss in summary["misses"]:
        print(f"MISSED: {miss}", file=sys.stderr)
    return 1 if summary["misses"] else 0


if __name__ == "__main__":
    sys.exit(main())
