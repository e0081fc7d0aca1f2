"""`make soak`: mixed traffic against our server for --minutes (default 10), loopback only, bounded in time.

Reports the RSS of the router and of each worker (psutil children) after a warm-up and at the end; growth > 5% fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter

import aiohttp
import msgspec
import psutil

import targets
from corpus import make_corpus
from loadgen import assert_loopback

GROWTH_LIMIT = 5.0  # per cent
# (weight, name): what a mixed production load looks like, plus the broken and impatient clients a server also meets.
MIX = [(35, "openai-1"), (15, "openai-b64-8"), (10, "infinity-4"), (10, "native-msgpack-16"), (5, "openai-128"),
       (5, "token-ids"), (7, "bad"), (5, "listing"), (8, "abandoned")]


def request_for(kind: str, rnd: random.Random, corpus: list[str]) -> tuple[str, str, bytes | None, dict, bool]:
    """(method, path, body, headers, expect_ok) for one request of `kind`."""
    texts = lambda k: [corpus[rnd.randrange(len(corpus))] for _ in range(k)]  # noqa: E731
    model, js = targets.MODEL, {"content-type": "application/json"}
    enc = msgspec.json.encode
    if kind == "openai-1":
        return "POST", "/v1/embeddings", enc({"model": model, "input": texts(1)[0]}), js, True
    if kind == "openai-b64-8":
        return "POST", "/v1/embeddings", enc({"model": model, "input": texts(8), "encoding_format": "base64"}), js, True
    if kind == "openai-128":
        return "POST", "/v1/embeddings", enc({"model": model, "input": texts(128)}), js, True
    if kind == "infinity-4":
        return "POST", "/embeddings", enc({"model": model, "input": texts(4)}), js, True
    if kind == "token-ids":
        ids = [[rnd.randrange(100, 50_000) for _ in range(rnd.randrange(5, 60))] for _ in range(2)]
        return "POST", "/v1/embeddings", enc({"model": model, "input": ids}), js, True
    if kind == "native-msgpack-16":
        body = msgspec.msgpack.encode({"items": [{"text": t} for t in texts(16)]})
        return "POST", f"/v1/encode/{model}", body, {"content-type": "application/msgpack"}, True
    if kind == "bad":
        bodies = [enc({"model": model, "input": []}), enc({"model": model, "input": 42}), b"{not json",
                  enc({"model": model, "input": "x", "encoding_format": "hex"})]
        return "POST", "/v1/embeddings", bodies[rnd.randrange(len(bodies))], js, False
    if kind == "listing":
        return "GET", ["/v1/models", "/models", "/readyz"][rnd.randrange(3)], None, {}, True
    return "POST", "/v1/embeddings", enc({"model": model, "input": texts(32)}), js, True  # abandoned mid-flight


async def traffic(base: str, corpus: list[str], seconds: float, concurrency: int, counts: Counter) -> None:
    weights, kinds = [w for w, _ in MIX], [k for _, k in MIX]
    stop_at = time.monotonic() + seconds

    async def client(seed: int, session: aiohttp.ClientSession) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < stop_at:
            kind = rnd.choices(kinds, weights)[0]
            method, path, body, headers, expect_ok = request_for(kind, rnd, corpus)
            timeout = aiohttp.ClientTimeout(total=rnd.uniform(0.002, 0.05) if kind == "abandoned" else 60)
            try:
                async with session.request(method, base + path, data=body, headers=headers, timeout=timeout) as r:
                    await r.read()
                    status = r.status
            except TimeoutError:
                counts["abandoned" if kind == "abandoned" else "timeout"] += 1
                continue
            except aiohttp.ClientError as exc:
                counts[f"client error {type(exc).__name__}"] += 1
                continue
            if status >= 500 and status != 503:
                counts[f"5xx {kind}"] += 1
            elif status in (429, 503):
                counts["shed"] += 1
            elif (status == 200) != expect_ok:
                counts[f"unexpected {status} {kind}"] += 1
            else:
                counts["ok"] += 1
                counts[f"  {kind}"] += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))


def rss(router: psutil.Process) -> dict[str, int]:
    """RSS in bytes of the router and each of its descendants, keyed 'router' or 'pid name'."""
    out = {"router": router.memory_info().rss}
    for child in router.children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            name = "resource_tracker" if "resource_tracker" in cmdline else cmdline.split(" ")[0][:40]
            out[f"{child.pid} {name}"] = child.memory_info().rss
        except psutil.Error:
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10, at most 120)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds of traffic before the start RSS is taken")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for our server (repeatable)")
    a = p.parse_args(argv)
    seconds = min(a.minutes, 120.0) * 60.0
    warmup = min(a.warmup, seconds / 4)
    print(f"# command: {' '.join([sys.executable, *sys.argv])}\n# load average: {os.getloadavg()}  {seconds:.0f} s "
          f"of mixed traffic at concurrency {a.concurrency} after {warmup:.0f} s of warm-up", flush=True)
    server = targets.ours(a.threads, a.server_arg)
    ok, why = server.start(240)
    if not ok or server.proc is None:
        print(f"our server did not start: {why}", file=sys.stderr)
        return 1
    base = f"http://127.0.0.1:{server.port}"
    assert_loopback(base)
    corpus, counts = make_corpus(2048), Counter()
    router = psutil.Process(server.proc.pid)
    try:
        idle = rss(router)
        asyncio.run(traffic(base, corpus, warmup, a.concurrency, counts))
        start, t0, samples = rss(router), time.monotonic(), []
        while (left := seconds - (time.monotonic() - t0)) > 0:
            asyncio.run(traffic(base, corpus, min(60.0, left), a.concurrency, counts))
            samples.append(rss(router))
            print(f"  {time.monotonic() - t0:6.0f} s  " + "  ".join(f"{k}: {v / 2**20:.0f} MiB"
                                                                    for k, v in samples[-1].items()), flush=True)
        end = rss(router)
    finally:
        server.stop()
    return report(idle, start, end, counts)


def report(idle: dict[str, int], start: dict[str, int], end: dict[str, int], counts: Counter) -> int:
    print(f"\n{'process':<48} {'idle MiB':>9} {'start MiB':>10} {'end MiB':>9} {'growth':>8}")
    flagged = []
    for name in sorted(set(start) | set(end)):
        s, e = start.get(name), end.get(name)
        growth = (e - s) / s * 100.0 if s and e else float("nan")
        mark = ""
        if s is None or e is None:
            mark = "  FLAG: process appeared or went away (a worker restart?)"
        elif growth > GROWTH_LIMIT:
            mark = f"  FLAG: grew more than {GROWTH_LIMIT:.0f}%"
        if mark:
            flagged.append(name)
        mib = lambda v: f"{v / 2**20:.1f}" if v else "-"  # noqa: E731
        print(f"{name:<48} {mib(idle.get(name)):>9} {mib(s):>10} {mib(e):>9} {growth:7.1f}%{mark}")
    print("requests: " + ", ".join(f"{k} {v}" for k, v in counts.most_common() if not k.startswith(" ")))
    print("answered as expected, by kind: " + ", ".join(f"{k.strip()} {v}" for k, v in counts.most_common()
                                                         if k.startswith(" ")))
    failures = sum(v for k, v in counts.items() if k.startswith(("5xx", "unexpected", "timeout", "client error")))
    if failures:
        print(f"FAILURE: {failures} requests failed or got an unexpected status", file=sys.stderr)
    if flagged:
        print(f"FAILURE: RSS flagged for {', '.join(flagged)}", file=sys.stderr)
    return 1 if failures or flagged else 0


if __name__ == "__main__":
    sys.exit(main())
