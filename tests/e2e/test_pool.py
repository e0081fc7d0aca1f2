"""Many models in one server: LRU eviction under a memory budget, crash isolation, restart back-off, idle TTL."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sie_sdk import SIEClient, admin
from sie_sdk.types import Item
from sie_worker.adapters import graph_cache
from sie_worker.options import EXPORT_HELPER_BASE_BYTES
from tests.server import MINILM, ROOT, Server, make_bundle


def workers(srv: Server) -> dict[str, dict]:
    """The worker table as `sie-admin workers ls --json` prints it."""
    out = io.StringIO()
    assert admin.main(["--url", srv.url, "workers", "ls", "--json"], out=out) == 0
    return {w["model"]: w for w in json.loads(out.getvalue())["workers"]}


def admin_table(srv: Server) -> str:
    """`sie-admin workers ls` as an operator sees it."""
    out = io.StringIO()
    assert admin.main(["--url", srv.url, "workers", "ls"], out=out) == 0
    return out.getvalue()


def loaded(srv: Server) -> set[str]:
    return {m for m, w in workers(srv).items() if w["state"] == "loaded"}


def encode(srv: Server, model: str, text: str = "x") -> None:
    with SIEClient(srv.url, retry_budget_s=60) as client:
        assert client.encode(model, Item(text=text))["dense"].shape == (16,)


@pytest.fixture
def budget_server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(["--bundle", str(make_bundle(tmp_path / "b", "fake.yaml")), "--memory-budget", "600MiB"],
                 log=tmp_path / "log").wait_ready()
    try:
        yield srv
    finally:
        srv.stop()


def test_loading_a_third_model_evicts_the_least_recently_used(budget_server: Server) -> None:
    srv = budget_server
    encode(srv, "test/fake-a")
    encode(srv, "test/fake-b")
    assert loaded(srv) == {"test/fake-a", "test/fake-b"}
    encode(srv, "test/fake-a")  # b is now the least recently used
    encode(srv, "test/fake-c")
    assert loaded(srv) == {"test/fake-a", "test/fake-c"}
    shown = admin_table(srv)
    assert "test/fake-c" in shown and "test/fake-a" in shown and "test/fake-b" not in shown
    table = workers(srv)
    assert table["test/fake-c"]["memory_bytes"] > 150 * 2**20  # measured RSS replaced the estimate
    reserved, measured = table["test/fake-c"]["memory_budget_bytes"], table["test/fake-c"]["memory_bytes"]
    assert reserved != 300 * 2**20 and abs(reserved - measured) < 0.1 * measured
    encode(srv, "test/fake-b")  # the evicted model reloads on its next request, evicting a (now LRU)
    assert loaded(srv) == {"test/fake-b", "test/fake-c"}
    devices = httpx.get(f"{srv.url}/admin/workers").json()["devices"]
    assert devices[0]["device"] == "cpu" and devices[0]["reserved_bytes"] <= devices[0]["budget_bytes"]


def test_a_working_set_that_grows_after_ready_counts_against_the_budget(budget_server: Server) -> None:
    """Reservations follow a worker's memory past its figure at Ready, so an eviction plan sees what it holds now."""
    srv = budget_server
    encode(srv, "test/fake-growing")  # ~50 MiB at Ready, then 300 MiB more after this batch
    row = workers(srv)["test/fake-growing"]
    assert row["memory_bytes"] > 300 * 2**20 and row["memory_budget_bytes"] >= row["memory_bytes"] * 0.95
    # Reserved as measured at Ready, a (300 MiB estimate) would fit beside it in 600 MiB; as it is, it does not.
    encode(srv, "test/fake-a")
    assert loaded(srv) == {"test/fake-a"}
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert 'sie_evictions_total{model="test/fake-growing",reason="memory"} 1.0' in metrics


def test_a_crashing_model_backs_off_and_never_locks_out_until_an_operator_evicts_it(tmp_path: Path) -> None:
    """test/fake-crashy's every worker exits on its first batch. Each crash doubles the back-off (2, 4, 8 s here);
    meanwhile requests get 503 MODEL_LOADING with Retry-After the time left, and after it the pool starts the next
    worker by itself: never the 502 lock-out of a crash budget. The operator's eviction forgets the back-off."""
    srv = Server(["--bundle", str(make_bundle(tmp_path / "b", "fake.yaml")), "--restart-backoff-max", "8"],
                 env={"SIE_RESTART_BACKOFF_S": "2"}, log=tmp_path / "log").wait_ready()
    url = f"{srv.url}/v1/encode/test/fake-crashy"
    try:
        longest: dict[int, float] = {}  # restarts so far -> the longest back-off left answered meanwhile
        codes: set[tuple[int, str]] = set()
        deadline = time.monotonic() + 90
        while 4 not in longest and time.monotonic() < deadline:
            response = httpx.post(url, json={"items": [{"text": "x"}]}, timeout=60)
            detail = response.json()["detail"]
            codes.add((response.status_code, detail["code"]))
            if detail.get("backoff_s"):
                left = detail["backoff_s"]
                longest[detail["restarts"]] = max(left, longest.get(detail["restarts"], 0))
                retry_after = int(response.headers["retry-after"])  # the time left, in whole seconds
                assert retry_after - 1 - 1e-3 <= left <= retry_after, (left, retry_after)
            time.sleep(0.1)
        assert codes == {(503, "MODEL_LOADING")}, codes  # never 502, never anything uncoded
        for restarts, first in ((1, 2), (2, 4), (3, 8), (4, 8)):  # doubling up to the cap of 8 s
            assert first / 2 < longest[restarts] <= first, longest
        row = workers(srv)["test/fake-crashy"]
        assert row["restarts"] >= 3
        shown = next(line for line in admin_table(srv).splitlines() if line.startswith("test/fake-crashy"))
        assert shown.split()[-2] == str(row["restarts"])  # the RESTARTS column
        evicted = httpx.post(f"{srv.url}/admin/workers/test/fake-crashy/evict").json()
        assert evicted["model"] == "test/fake-crashy"
        assert "test/fake-crashy" not in workers(srv) or workers(srv)["test/fake-crashy"]["restarts"] == 0
    finally:
        srv.stop()


def test_idle_ttl_evicts_unused_models(tmp_path: Path) -> None:
    srv = Server(["--bundle", str(make_bundle(tmp_path / "b", "fake.yaml")), "--idle-ttl", "2",
                  "--pin", "test/fake-e5", "--preload", "test/fake-e5"], log=tmp_path / "log").wait_ready()
    try:
        # The OpenAI route waits for the load, so the request lands before the TTL can evict the fresh worker.
        assert httpx.post(f"{srv.url}/v1/embeddings", json={"model": "test/fake-dense", "input": "x"},
                          timeout=60).status_code == 200
        assert "test/fake-dense" in loaded(srv)
        deadline = time.monotonic() + 10
        while "test/fake-dense" in loaded(srv) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert loaded(srv) == {"test/fake-e5"}  # pinned stays
    finally:
        srv.stop()


async def _hammer(url: str, model: str, texts: list[str]) -> list[tuple[int, str | None]]:
    async with httpx.AsyncClient(timeout=60) as client:
        async def one(text: str) -> tuple[int, str | None]:
            r = await client.post(f"{url}/v1/encode/{model}", json={"items": [{"text": text}]})
            return r.status_code, (r.json()["detail"]["code"] if r.status_code != 200 else None)
        return list(await asyncio.gather(*(one(t) for t in texts)))


def test_kill_9_fails_only_that_models_requests_and_it_recovers(tmp_path: Path) -> None:
    srv = Server(["--bundle", str(make_bundle(tmp_path / "b")), "-m", MINILM, "-m", "test/fake-dense"],
                 log=tmp_path / "log").wait_ready()
    try:
        victim_pid = workers(srv)[MINILM]["pid"]

        async def scenario() -> tuple[list, list]:
            texts = [f"sentence number {i} about nothing much" for i in range(150)]
            minilm = asyncio.create_task(_hammer(srv.url, MINILM, texts))
            fake = asyncio.create_task(_hammer(srv.url, "test/fake-dense", texts))
            await asyncio.sleep(0.3)
            os.kill(victim_pid, signal.SIGKILL)
            return await minilm, await fake

        minilm, fake = asyncio.run(scenario())
        assert all(status == 200 for status, _ in fake)
        failures = {(s, c) for s, c in minilm if s != 200}
        assert failures <= {(503, "MODEL_LOADING")} and failures, "the kill must fail some in-flight requests"
        # The OpenAI route holds a request through the reload; during the restart back-off it answers 503 with
        # Retry-After, which a polite client honours (as the sie-sdk and openai clients do).
        started = time.monotonic()
        while True:
            response = httpx.post(f"{srv.url}/v1/embeddings", json={"model": MINILM, "input": "back again"},
                                  timeout=60)
            if response.status_code != 503:
                break
            assert int(response.headers["retry-after"]) >= 1 and time.monotonic() - started < 30, response.text
            time.sleep(int(response.headers["retry-after"]))
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < 30
        assert workers(srv)[MINILM]["pid"] != victim_pid
    finally:
        srv.stop()


LEAN_AND_HEAVY = """\
# No memory_mb: the router estimates each from a per-process base it learns, then evicts if the measure says more.
sie_id: test/lean-a
package_backed: true
tasks: {encode: {dense: {dim: 16}}}
profiles: {default: {adapter: fake, max_batch_tokens: 16384, adapter_options: {loadtime: {dim: 16, memory_mb: 100}}}}
---
sie_id: test/lean-b
package_backed: true
tasks: {encode: {dense: {dim: 16}}}
profiles: {default: {adapter: fake, max_batch_tokens: 16384, adapter_options: {loadtime: {dim: 16, memory_mb: 100}}}}
---
sie_id: test/heavy
package_backed: true
tasks: {encode: {dense: {dim: 16}}}
profiles: {default: {adapter: fake, max_batch_tokens: 16384, adapter_options: {loadtime: {dim: 16, memory_mb: 600}}}}
"""


def lean_bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "lean.yaml").write_text(LEAN_AND_HEAVY)
    return bundle


def test_a_worker_that_measures_more_than_its_estimate_evicts_lru_models_right_after_ready(tmp_path: Path) -> None:
    """Two lean workers teach the router a small base, so the heavy model's estimate fits beside them; once it
    measures itself (~650 MiB) the device is over its 700 MiB budget, and both idle lean models go at once."""
    srv = Server(["--bundle", str(lean_bundle(tmp_path)), "--memory-budget", "700MiB"],
                 log=tmp_path / "log").wait_ready()
    try:
        encode(srv, "test/lean-a")
        encode(srv, "test/lean-b")
        assert loaded(srv) == {"test/lean-a", "test/lean-b"}
        encode(srv, "test/heavy")
        assert loaded(srv) == {"test/heavy"}
        assert workers(srv)["test/heavy"]["memory_bytes"] > 600 * 2**20
        devices = httpx.get(f"{srv.url}/admin/workers").json()["devices"]
        assert devices[0]["reserved_bytes"] <= devices[0]["budget_bytes"] * 1.05
    finally:
        srv.stop()


def test_a_worker_over_the_budget_with_nothing_to_evict_fails_its_load_and_the_next_try_fails_before_spawn(
        tmp_path: Path) -> None:
    """The heavy model's default estimate (400 MiB) fits a 400 MiB budget; its measure (~650 MiB) does not, and no
    other model can go: its worker is stopped and the load answers a retryable 503. Its measure is remembered, so the
    next try (the refusal does not stand here) is refused without a spawn, and a lean model still loads (the refused
    worker taught no base)."""
    srv = Server(["--bundle", str(lean_bundle(tmp_path)), "--memory-budget", "400MiB"],
                 log=tmp_path / "log", env={"SIE_LOAD_REFUSAL_HOLD_S": "0"}).wait_ready()
    body = {"model": "test/heavy", "input": "x"}
    try:
        # The OpenAI route waits out a load (--load-wait-s), so it sees how the load ended.
        response = httpx.post(f"{srv.url}/v1/embeddings", json=body, timeout=120)
        assert response.status_code == 503 and "retry-after" in response.headers
        assert "over its budget" in response.json()["error"]["message"]
        assert loaded(srv) == set()
        again = httpx.post(f"{srv.url}/v1/embeddings", json=body, timeout=120)
        assert again.status_code == 503 and "needs about" in again.json()["error"]["message"]
        encode(srv, "test/lean-a")
        assert loaded(srv) == {"test/lean-a"}
    finally:
        srv.stop()


def _fake_model(key: str, memory_mb: int, loadtime: str = "{dim: 16}") -> str:
    return (f"sie_id: {key}\npackage_backed: true\nmemory_mb: {memory_mb}\n"
            "tasks: {encode: {dense: {dim: 16}}, score: {}, extract: {}}\n"
            "profiles: {default: {adapter: fake, max_batch_tokens: 16384, "
            f"adapter_options: {{loadtime: {loadtime}}}}}}}\n")


TOO_BIG = "test/too-big"
# Three models loaded on first use under the issue's 294M (280 MiB) budget: two fit, the third's 400 MiB never does.
# A fourth says it exports a graph first, as a lean worker's first load does: its worker fits, the export helper's
# memory (EXPORT_HELPER_BASE_BYTES, over 512 MiB) does not.
REFUSAL_BUNDLE = "---\n".join([_fake_model("test/small-a", 100), _fake_model("test/small-b", 100),
                               _fake_model(TOO_BIG, 400),
                               _fake_model("test/exports", 60, "{dim: 16, announce_export: true}")])
# One request per API family for a model; each is answered in its own envelope.
ROUTES = [
    ("native", "/v1/encode/{m}", {"items": [{"text": "x"}]}),
    ("native", "/v1/score/{m}", {"query": {"text": "q"}, "items": [{"text": "d"}]}),
    ("native", "/v1/extract/{m}", {"items": [{"text": "x"}], "params": {"labels": ["a"]}}),
    ("openai", "/v1/embeddings", {"model": "{m}", "input": "x"}),
    ("cohere", "/v1/rerank", {"model": "{m}", "query": "q", "documents": ["d"]}),
    ("infinity", "/embeddings", {"model": "{m}", "input": ["x"]}),
    ("infinity", "/rerank", {"model": "{m}", "query": "q", "documents": ["d"]}),
    ("tei", "/tei/{m}/rerank", {"query": "q", "texts": ["d"]}),
]


def _ask(srv: Server, path: str, body: dict, model: str) -> httpx.Response:
    filled = json.loads(json.dumps(body).replace("{m}", model))
    return httpx.post(srv.url + path.replace("{m}", model), json=filled, timeout=150)


def _refused_loads(srv: Server, model: str) -> float:
    metrics = httpx.get(f"{srv.url}/metrics").text
    line = f'sie_model_loads_total{{model="{model}",result="refused"}} '
    return sum(float(row.split()[-1]) for row in metrics.splitlines() if row.startswith(line))


def _code(api: str, response: httpx.Response) -> object:
    """The error code as the API's own envelope carries it."""
    body = response.json()
    return {"native": lambda: body["detail"]["code"], "openai": lambda: body["error"]["code"],
            "cohere": lambda: body["error"]["code"], "infinity": lambda: body["error"]["code"],
            "tei": lambda: body["error_type"]}[api]()


def test_a_load_refused_for_memory_is_every_routes_answer_and_is_tried_once(tmp_path: Path) -> None:
    """The issue: a model that does not fit, served from a bundle, answered the native route's polls 503
    MODEL_LOADING 239 times in a row, each poll a new load that placement refused again; the SDK retries
    MODEL_LOADING forever. Now every API answers the refusal, with Retry-After, and one load was tried while the
    refusal stands (held 600 s here, so that the test's pace cannot matter)."""
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "models.yaml").write_text(REFUSAL_BUNDLE)
    srv = Server(["--bundle", str(bundle), "--memory-budget", "294M"], log=tmp_path / "log",
                 env={"SIE_LOAD_REFUSAL_HOLD_S": "600"}).wait_ready()
    try:
        encode(srv, "test/small-a")
        encode(srv, "test/small-b")
        # The native route waits for no load, yet the request that starts one is told placement's answer.
        first = _ask(srv, *ROUTES[0][1:], TOO_BIG)
        assert first.status_code == 503 and first.headers["x-sie-error-code"] == "RESOURCE_EXHAUSTED", first.text
        expected = {"native": "RESOURCE_EXHAUSTED", "openai": "resource_exhausted", "cohere": "resource_exhausted",
                    "infinity": 503, "tei": "Overloaded"}
        for _ in range(3):
            for api, path, body in ROUTES:
                response = _ask(srv, path, body, TOO_BIG)
                assert response.status_code == (429 if api == "tei" else 503), (path, response.text)
                assert response.headers["x-sie-error-code"] == "RESOURCE_EXHAUSTED", path
                assert int(response.headers["retry-after"]) >= 1, path
                assert _code(api, response) == expected[api], (path, response.text)
                assert "needs about 400 MiB on cpu" in response.text, path
        assert _refused_loads(srv, TOO_BIG) == 1
        assert loaded(srv) == {"test/small-a", "test/small-b"}, "the refusal evicted nothing and loaded nothing"
    finally:
        srv.stop()


def test_an_export_helper_is_reserved_while_it_runs_and_refused_when_it_cannot_fit(tmp_path: Path) -> None:
    """A worker that says it exports first (a lean worker's first load) gets the helper's memory reserved beside its
    own until Ready, when the ledger holds what it measured; where the helper cannot fit, the load is refused."""
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "models.yaml").write_text(REFUSAL_BUNDLE)
    body = {"model": "test/exports", "input": "x"}
    for budget, fits in (("294M", False), ("700MiB", True)):
        srv = Server(["--bundle", str(bundle), "--memory-budget", budget], log=tmp_path / f"log-{budget}",
                     env={"SIE_LOAD_REFUSAL_HOLD_S": "600"}).wait_ready()
        try:
            response = httpx.post(f"{srv.url}/v1/embeddings", json=body, timeout=150)  # waits out the load
            if not fits:
                assert response.status_code == 503 and "exporting its graph" in response.text, response.text
                assert response.headers["x-sie-error-code"] == "RESOURCE_EXHAUSTED"
                assert loaded(srv) == set() and _refused_loads(srv, "test/exports") == 1
                continue
            assert response.status_code == 200, response.text
            row = workers(srv)["test/exports"]
            # After Ready the ledger holds what the worker measured then (the listing's figure is read now), not
            # the helper's beside it.
            assert row["memory_budget_bytes"] < EXPORT_HELPER_BASE_BYTES, row
            assert abs(row["memory_budget_bytes"] - row["memory_bytes"]) < 0.1 * row["memory_bytes"], row
            helper_mib = EXPORT_HELPER_BASE_BYTES / 2**20  # a fake model has no weight files
            assert f"{helper_mib:.0f} MiB more reserved until it is ready" in srv.log_path.read_text()
        finally:
            srv.stop()


# Runs in child processes, so that torch stays out of this one.
BUILD_TINY = ("import sys; from pathlib import Path; from tests.tiny_models import build_dense_st; "
              "[build_dense_st(Path(p)) for p in sys.argv[1:]]")


def test_tiny_lean_models_start_under_the_issues_294M_budget(tmp_path: Path) -> None:
    """Before, the first estimate on the CPU was a torch worker's (400 MiB) and a server with tiny dense models under
    --memory-budget 294M (280 MiB) refused to start: "needs about 400 MiB on cpu, 280 MiB is free". A lean worker is
    estimated as one from the start (~144 MiB), and once one measured itself (~120 MiB) the next fits beside it.
    Their graphs are exported beforehand: the export helper alone needs more than this budget."""
    folders = [tmp_path / "tiny-0", tmp_path / "tiny-1"]
    subprocess.run([sys.executable, "-c", BUILD_TINY, *map(str, folders)], cwd=ROOT, check=True)
    graphs = tmp_path / "xdg" / "sie" / "graphs"  # the workers' default cache under XDG_CACHE_HOME
    for folder in folders:
        target = graphs / graph_cache.indexed_key(folder, graphs)
        subprocess.run([sys.executable, "-m", "sie_worker.export_graph", str(folder), str(target), str(os.getpid())],
                       check=True)
    args = ["--memory-budget", "294M"]
    for i, folder in enumerate(folders):
        args += ["-m", str(folder), "--served-model-name", f"tiny-{i}"]
    srv = Server(args, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")}, log=tmp_path / "log").wait_ready(timeout=120)
    try:
        table = workers(srv)
        assert len(table) == 2 and all(w["state"] == "loaded" for w in table.values()), table
        assert all(w["memory_bytes"] < 160 * 2**20 for w in table.values()), table
        assert "exports its graph first" not in srv.log_path.read_text()
    finally:
        srv.stop()
