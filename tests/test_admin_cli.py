"""`sie-admin`: the workers table, JSON, evict and errors against an in-test admin API, and Kubernetes discovery of
router pods through the pod proxy of an in-memory API server (kmock)."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sie_sdk import admin
from sie_sdk.admin_k8s import ADMIN_TOKEN_HEADER
from tests import declared
from tests.server import MINILM, Server

MIB = 1 << 20
TOKEN = "s3cret"


def worker(model: str, **fields: Any) -> dict[str, Any]:
    row = {"model": model, "state": "loaded", "pid": 4242, "device": "cpu", "memory_bytes": 421 * MIB,
           "memory_budget_bytes": 512 * MIB, "queue_depth": 3, "requests_served": 17, "last_used_s_ago": 125.4,
           "uptime_s": 3725.0, "pinned": False, "restarts": 0, "backoff_s": None}
    return row | fields


WORKERS = {
    "workers": [
        worker("org/model-a"),
        worker("model-b", state="loading", pid=None, memory_bytes=None, queue_depth=0, requests_served=0,
               last_used_s_ago=None, uptime_s=2.0, pinned=True),
        worker("model-c", state="failed", pid=None, device=None, memory_bytes=None, memory_budget_bytes=None,
               queue_depth=0, requests_served=0, last_used_s_ago=None, uptime_s=None, last_error="no weights"),
        worker("model-d", state="available", pid=None, device=None, memory_bytes=None, memory_budget_bytes=None,
               queue_depth=0, requests_served=0, last_used_s_ago=None, uptime_s=None, restarts=4, backoff_s=3.5),
    ],
    "devices": [{"device": "cpu", "total_bytes": 16 << 30, "used_bytes": 3 << 29, "budget_bytes": 8 << 30,
                 "reserved_bytes": 1024 * MIB}],
}
KNOWN = {"org/model-a", "model-b", "model-c", "model-d"}
API_KEY = "k3y"
MODELS = {"object": "list", "data": [], "models": [
    {"name": "org/model-a", "family": "dense", "state": "loaded", "outputs": ["dense"], "dims": {"dense": 384},
     "device": "cpu", "engine": "openvino", "memory_bytes": 421 * MIB, "last_error": None},
    {"name": "model-c", "family": "sparse", "state": "failed", "outputs": ["sparse"], "dims": {"sparse": 30522},
     "device": None, "engine": None, "memory_bytes": None, "last_error": "no weights"},
]}


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = admin.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def lines_by_first_cell(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}


# --- one server: a fake of the router's admin API ------------------------------------------------------------------

class AdminAPI(BaseHTTPRequestHandler):
    token: str | None = None
    seen: list[tuple[str, str, str | None]]
    loaded: set[str]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorized(self) -> bool:
        self.seen.append((self.command, self.path, self.headers.get("Authorization")))
        if self.token is None or self.headers.get("Authorization") == f"Bearer {self.token}":
            return True
        self.reply(401, {"detail": {"code": "UNAUTHORIZED", "message": "the admin API needs the admin token"}})
        return False

    def do_GET(self) -> None:
        if self.path == "/v1/models":  # the API key's route, not the admin token's
            self.seen.append((self.command, self.path, self.headers.get("Authorization")))
            self.reply(200, MODELS)
        elif self.authorized():
            self.reply(200, WORKERS) if self.path == "/admin/workers" else self.reply(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        if not self.authorized():
            return
        model = self.path.removeprefix("/admin/workers/").removesuffix("/evict")
        if model not in KNOWN:
            self.reply(404, {"detail": {"code": "MODEL_NOT_FOUND", "message": f"model {model!r} is not served"}})
            return
        self.reply(200, {"model": model, "evicted": model in self.loaded})
        self.loaded.discard(model)


@pytest.fixture
def api() -> Iterator[tuple[str, type[AdminAPI]]]:
    handler = type("Handler", (AdminAPI,), {"seen": [], "loaded": {"org/model-a", "model-b"}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_ls_prints_an_aligned_table_with_human_units(api: tuple[str, type[AdminAPI]]) -> None:
    url, _ = api
    code, out, err = run("--url", url, "workers", "ls")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == list(admin.WORKER_COLUMNS)
    rows = lines_by_first_cell(out)
    assert rows["org/model-a"] == ["org/model-a", "loaded", "4242", "cpu", "421Mi/512Mi", "3", "17", "2m5s", "1h2m",
                                   "0", "-"]
    assert rows["model-b"] == ["model-b", "loading,pinned", "-", "cpu", "-/512Mi", "0", "0", "-", "2s", "0", "-"]
    assert rows["model-c"] == ["model-c", "failed", "-", "-", "-/-", "0", "0", "-", "-", "0", "-"]
    # a model whose worker crashed four times, its next worker 3.5 s away
    assert rows["model-d"] == ["model-d", "available", "-", "-", "-/-", "0", "0", "-", "-", "4", "4s"]
    assert "model-c: last error: no weights" in out
    # aligned: every column of the worker table starts at the same offset on every line
    header_at = [lines[0].index(col) for col in ("STATE", "MEMORY", "UPTIME", "RESTARTS", "BACKOFF")]
    for line in lines[1:5]:
        assert all(line[at - 1] == " " and line[at] != " " for at in header_at)
    assert rows["DEVICE"] == list(admin.DEVICE_COLUMNS) and rows["cpu"] == ["cpu", "1.5Gi", "16Gi", "8Gi", "1Gi"]


def test_ls_json_gives_the_same_data(api: tuple[str, type[AdminAPI]]) -> None:
    code, out, _ = run("--url", api[0], "workers", "ls", "--json")
    assert code == 0 and json.loads(out) == WORKERS


def test_evict_sends_the_token_and_reports_what_happened(api: tuple[str, type[AdminAPI]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler = api
    handler.token = TOKEN
    assert run("--url", url, "--token", TOKEN, "workers", "evict", "org/model-a") == (0, "evicted org/model-a\n", "")
    assert handler.seen[-1] == ("POST", "/admin/workers/org/model-a/evict", f"Bearer {TOKEN}")
    monkeypatch.setenv("SIE_ADMIN_TOKEN", TOKEN)
    assert run("--url", url, "workers", "evict", "org/model-a") == (0, "org/model-a was not loaded\n", "")


def test_evict_without_the_token_fails_with_the_servers_reason(api: tuple[str, type[AdminAPI]],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler = api
    handler.token = TOKEN
    monkeypatch.delenv("SIE_ADMIN_TOKEN", raising=False)
    code, out, err = run("--url", url, "workers", "evict", "org/model-a")
    assert (code, out) == (1, "")
    assert err == f"sie-admin: error: {url}: HTTP 401 UNAUTHORIZED: the admin API needs the admin token\n"
    assert handler.loaded == {"org/model-a", "model-b"}
    assert run("--url", url, "--token", "wrong", "workers", "ls")[0] == 1


def test_evict_of_an_unknown_model_exits_1_with_the_message(api: tuple[str, type[AdminAPI]]) -> None:
    code, out, err = run("--url", api[0], "workers", "evict", "no/such-model")
    assert (code, out) == (1, "")
    assert "HTTP 404 MODEL_NOT_FOUND: model 'no/such-model' is not served" in err and len(err.splitlines()) == 1


def test_unreachable_server_exits_1_with_one_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = run("--url", f"http://127.0.0.1:{port}", "workers", "ls")
    assert (code, out) == (1, "")
    assert err.startswith(f"sie-admin: error: cannot connect to http://127.0.0.1:{port}") and err.count("\n") == 1


def test_a_server_that_is_not_sie_is_named(api: tuple[str, type[AdminAPI]]) -> None:
    code, _, err = run("--url", api[0] + "/elsewhere", "workers", "ls")
    assert code == 1 and "HTTP 404: Not Found" in err


def test_help_and_the_module_entry_point(api: tuple[str, type[AdminAPI]]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("--help")
    assert exit_info.value.code == 0
    done = subprocess.run([sys.executable, "-m", "sie_sdk.admin", "--url", api[0], "workers", "ls", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout) == WORKERS
    usage = subprocess.run([sys.executable, "-m", "sie_sdk.admin", "workers", "--help"], capture_output=True,
                           text=True, timeout=60).stdout
    assert "ls" in usage and "evict" in usage


def test_global_options_go_anywhere_on_the_line(api: tuple[str, type[AdminAPI]]) -> None:
    url, handler = api
    handler.token = TOKEN
    before = run("--url", url, "--token", TOKEN, "workers", "ls", "--json")
    assert before[0] == 0 and json.loads(before[1]) == WORKERS
    for argv in (("workers", "ls", "--url", url, "--token", TOKEN, "--json"),
                 ("workers", "--url", url, "ls", "--json", "--token", TOKEN),
                 ("--url", url, "workers", "ls", f"--token={TOKEN}", "--json")):
        assert run(*argv) == before, argv
    # one given before the command is kept when the command does not repeat it; a later one wins
    assert run("--url", url, "workers", "evict", "org/model-a", "--token", TOKEN) == (0, "evicted org/model-a\n", "")
    code, _, err = run("--url", url, "--token", TOKEN, "workers", "ls", "--token", "wrong")
    assert code == 1 and "401 UNAUTHORIZED" in err


def test_models_ls_shows_family_state_outputs_and_engine(api: tuple[str, type[AdminAPI]]) -> None:
    url, handler = api
    handler.token = TOKEN
    code, out, err = run("models", "ls", "--url", url, "--api-key", API_KEY, "--token", TOKEN)
    assert (code, err) == (0, "")
    rows = lines_by_first_cell(out)
    assert rows["MODEL"] == list(admin.MODEL_COLUMNS)
    assert rows["org/model-a"] == ["org/model-a", "dense", "loaded", "dense", "dense:384", "cpu", "openvino", "421Mi"]
    assert rows["model-c"] == ["model-c", "sparse", "failed", "sparse", "sparse:30522", "-", "-", "-"]
    assert "model-c: last error: no weights" in out
    # /v1/models takes the API key, never the admin token
    assert handler.seen[-1] == ("GET", "/v1/models", f"Bearer {API_KEY}")
    code, out, _ = run("models", "ls", "--json", "--url", url)
    assert code == 0 and json.loads(out) == {"models": MODELS["models"]}


def test_watch_shows_the_table_again_until_interrupted(api: tuple[str, type[AdminAPI]]) -> None:
    url, handler = api
    proc = subprocess.Popen([sys.executable, "-m", "sie_sdk.admin", "workers", "ls", "--watch", "--interval", "0.2",
                             "--url", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # A fourth request comes after the third table was printed whole: SIGINT then cannot cut one short.
        while sum(1 for method, path, _ in handler.seen if path == "/admin/workers") < 4:
            assert proc.poll() is None and time.monotonic() < deadline, "the watch stopped asking"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (0, "")
    tables = [t for t in out.split("Every 0.2s: ") if t]
    assert len(tables) >= 3 and all("org/model-a" in t and "loading,pinned" in t for t in tables[:3])
    assert run("workers", "ls", "--watch", "--interval", "0", "--url", url)[0] == 2


def ctrl_c() -> None:
    """What a SIGINT does on the main thread, at a chosen point: the handler in place, called. A real signal to the
    test process could land on any of its threads (a CI run crashed at a test that sent one); the subprocess test sends
    real ones."""
    handler = signal.getsignal(signal.SIGINT)
    assert callable(handler)
    handler(signal.SIGINT, None)


def test_ctrl_c_during_a_listing_ends_the_watch_once_that_listing_is_shown() -> None:
    """The signal is only noted while a listing runs (its HTTP requests are never cut short), then ends the watch."""
    before = signal.getsignal(signal.SIGINT)
    shown: list[str] = []

    def listing(out: io.StringIO, err: io.StringIO) -> int:
        ctrl_c()
        shown.append("finished")
        print("a listing", file=out)
        return 0

    out = io.StringIO()
    assert admin.watch(listing, 60.0, out, io.StringIO()) == 0, "and no 60 s pause after it"
    assert shown == ["finished"] and out.getvalue().count("a listing") == 1
    assert signal.getsignal(signal.SIGINT) is before, "the watch's handler is gone with it"


def test_ctrl_c_during_the_pause_ends_the_watch_at_once() -> None:
    def pause(seconds: float) -> None:
        ctrl_c()
        raise AssertionError("the pause went on after Ctrl-C")

    assert admin.watch(lambda out, err: 0, 60.0, io.StringIO(), io.StringIO(), sleep=pause) == 0


def test_models_ls_against_a_real_server(server: Server) -> None:
    """The session's server: the default and test bundles, MiniLM and test/fake-dense loaded at start."""
    code, out, err = run("models", "ls", "--url", server.url)
    assert (code, err) == (0, "")
    rows = lines_by_first_cell(out)
    assert rows[MINILM][:5] == [MINILM, "dense", "loaded", "dense", "dense:384"]
    assert rows["test/fake-dense"][:3] == ["test/fake-dense", "fake", "loaded"]
    assert rows["naver/splade-v3"][:4] == ["naver/splade-v3", "sparse", "available", "sparse"]
    assert rows["test/fake-broken"][1] == "fake"


@pytest.mark.parametrize(("value", "text"), [(None, "-"), (0, "0"), (1000, "1000"), (1536, "1.5Ki"),
                                             (421 * MIB, "421Mi"), (10 << 30, "10Gi"), (3 << 39, "1.5Ti")])
def test_human_bytes(value: int | None, text: str) -> None:
    assert admin.human_bytes(value) == text


@pytest.mark.parametrize(("value", "text"), [(None, "-"), (0.25, "0.2s"), (59.4, "59s"), (60, "1m"), (125, "2m5s"),
                                             (3600, "1h"), (3725, "1h2m"), (90061, "1d1h")])
def test_human_duration(value: float | None, text: str) -> None:
    assert admin.human_duration(value) == text


# --- Kubernetes: router pods discovered by label, queried through the API server's pod proxy (kmock) --------------

NS, PORT = "sie", 8080
K8S_TOKEN = "k8s-bearer"
PODS = {  # name -> (labels, phase)
    "router-a": ({"app": "sie", "tier": "router"}, "Running"),
    "router-b": ({"app": "sie", "tier": "router"}, "Running"),
    "router-c": ({"app": "sie", "tier": "router"}, "Pending"),
    "other": ({"app": "other"}, "Running"),
}
POD_WORKERS = {
    "router-a": {"workers": [worker("org/model-a", pid=11)], "devices": [WORKERS["devices"][0]]},
    "router-b": {"workers": [worker("org/model-a", pid=21), worker("model-b", pid=22, state="available")],
                 "devices": []},
}


def matches(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selectors (`a=b,c!=d`): kmock 0.8 stores pods but ignores `labelSelector`."""
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            key, value = term.split("!=")
            if labels.get(key) == value:
                return False
        else:
            key, value = term.replace("==", "=").split("=")
            if labels.get(key) != value:
                return False
    return True


class Cluster:
    def __init__(self, k: Any, kubeconfig: Path) -> None:
        self.k, self.kubeconfig = k, kubeconfig
        self.proxied: list[tuple[str, str, str | None, str | None]] = []  # pod, method+path, k8s auth, admin token

    def proxy_path(self, pod: str, path: str) -> str:
        return f"/api/v1/namespaces/{NS}/pods/{pod}:{PORT}/proxy{path}"

    def serve(self, method: str, pod: str, path: str, answer: Any, status: int = 200) -> None:
        import kmock

        def respond(request: Any) -> Any:
            auth, token = request.headers.get("Authorization"), request.headers.get(ADMIN_TOKEN_HEADER)
            self.proxied.append((pod, f"{method} {path}", auth, token))
            if token != TOKEN:
                return kmock.Response(status=401, payload={"detail": {"code": "UNAUTHORIZED", "message": "token"}})
            return kmock.Response(status=status, payload=answer)

        self.k[f"{method.lower()} {self.proxy_path(pod, path)}"] << respond

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        base = ("--namespace", NS, "--selector", "app=sie", "--kubeconfig", str(self.kubeconfig), "--token", TOKEN)
        return await asyncio.to_thread(run, *base, *argv)


def write_kubeconfig(path: Path, server: str) -> Path:
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
              "clusters": [{"name": "kmock", "cluster": {"server": server}}],
              "users": [{"name": "admin", "user": {"token": K8S_TOKEN}}],
              "contexts": [{"name": "test", "context": {"cluster": "kmock", "user": "admin", "namespace": NS}}]}
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    kmock = declared.module("kmock")
    declared.module("kubernetes")
    async with kmock.KubernetesEmulator() as k, kmock.Server(k) as srv:
        pods = kmock.resource("", "v1", "pods")
        for name, (labels, phase) in PODS.items():
            k.objects[pods, NS, name] = {"apiVersion": "v1", "kind": "Pod", "status": {"phase": phase},
                                         "metadata": {"name": name, "namespace": NS, "labels": labels}}

        def list_pods(request: Any) -> dict[str, Any]:
            selector = request.params.get("labelSelector", "")
            items = [obj.raw for (_, ns, _), obj in k.objects.items() if ns == NS and not obj.deleted]
            return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
                    "items": [raw for raw in items if matches(raw["metadata"].get("labels", {}), selector)]}

        k[f"get /api/v1/namespaces/{NS}/pods"] << list_pods
        yield Cluster(k, write_kubeconfig(tmp_path / "kubeconfig", str(srv.url)))


async def test_ls_aggregates_the_running_router_pods_only(cluster: Cluster) -> None:
    for pod, answer in POD_WORKERS.items():
        cluster.serve("GET", pod, "/admin/workers", answer)
    code, out, err = await cluster.cli("workers", "ls")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["POD", *admin.WORKER_COLUMNS]
    rows = [line.split() for line in lines[1:4]]
    assert [(r[0], r[1], r[3]) for r in rows] == [("router-a", "org/model-a", "11"), ("router-b", "org/model-a", "21"),
                                                 ("router-b", "model-b", "22")]
    assert "other" not in out and "router-c" not in out
    assert lines_by_first_cell(out)["POD"][:2] == ["POD", "DEVICE"]  # the device table has the POD column too
    assert sorted(p for p, *_ in cluster.proxied) == ["router-a", "router-b"]
    # the API server authenticates the kubeconfig's token; the admin token rides in its own header
    assert {(auth, token) for *_, auth, token in cluster.proxied} == {(f"Bearer {K8S_TOKEN}", TOKEN)}
    listing = [r for r in cluster.k if r.url.path == f"/api/v1/namespaces/{NS}/pods"]
    assert [r.params.get("labelSelector") for r in listing] == ["app=sie"]


async def test_ls_json_tags_each_row_with_its_pod(cluster: Cluster) -> None:
    for pod, answer in POD_WORKERS.items():
        cluster.serve("GET", pod, "/admin/workers", answer)
    code, out, _ = await cluster.cli("workers", "ls", "--json")
    data = json.loads(out)
    assert code == 0 and [(w["pod"], w["model"], w["pid"]) for w in data["workers"]] == [
        ("router-a", "org/model-a", 11), ("router-b", "org/model-a", 21), ("router-b", "model-b", 22)]
    assert data["devices"] == [{"pod": "router-a"} | WORKERS["devices"][0]]


async def test_evict_goes_to_every_pod(cluster: Cluster) -> None:
    cluster.serve("POST", "router-a", "/admin/workers/org/model-a/evict", {"model": "org/model-a", "evicted": True})
    cluster.serve("POST", "router-b", "/admin/workers/org/model-a/evict", {"model": "org/model-a", "evicted": False})
    code, out, err = await cluster.cli("workers", "evict", "org/model-a")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["router-a: evicted org/model-a", "router-b: org/model-a was not loaded"]


async def test_one_unreachable_pod_is_reported_and_the_others_still_listed(cluster: Cluster) -> None:
    cluster.serve("GET", "router-a", "/admin/workers", POD_WORKERS["router-a"])
    status = {"kind": "Status", "status": "Failure", "code": 503, "reason": "ServiceUnavailable",
              "message": 'error trying to reach service: dial tcp 10.0.0.7:8080: connect: connection refused'}
    cluster.serve("GET", "router-b", "/admin/workers", status, status=503)
    code, out, err = await cluster.cli("workers", "ls")
    assert code == 1 and "router-a" in out and "router-b" not in out
    assert err == ("sie-admin: error: pod router-b: HTTP 503 ServiceUnavailable: error trying to reach service: "
                   "dial tcp 10.0.0.7:8080: connect: connection refused\n")


async def test_no_matching_pod_and_no_cluster_exit_1(cluster: Cluster, tmp_path: Path) -> None:
    code, _, err = await cluster.cli("--selector", "app=nothing", "workers", "ls")
    assert code == 1 and err == f"sie-admin: error: no Running pod matches 'app=nothing' in namespace '{NS}'\n"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = write_kubeconfig(tmp_path / "dead", f"http://127.0.0.1:{port}")
    code, _, err = await cluster.cli("--kubeconfig", str(dead), "workers", "ls")
    assert code == 1 and err.startswith(f"sie-admin: error: cannot reach the Kubernetes API at http://127.0.0.1:{port}")
