"""`sie-admin`: list and evict the model workers, and list, add and remove the models, of one SIE server (`--url`) or
of every router pod of a Kubernetes deployment (`--namespace/--selector`, through the API server's pod proxy)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Protocol, TextIO
from urllib.parse import quote

import httpx


class Fetch(Protocol):
    """(method, path under the router root, JSON body) -> (HTTP status, body)."""

    def __call__(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]: ...


WORKER_COLUMNS = ("MODEL", "STATE", "PID", "DEVICE", "MEMORY", "QUEUE", "SERVED", "LAST-USED", "UPTIME", "RESTARTS",
                  "BACKOFF")
DEVICE_COLUMNS = ("DEVICE", "USED", "TOTAL", "BUDGET", "RESERVED")
MODEL_COLUMNS = ("MODEL", "FAMILY", "STATE", "OUTPUTS", "DIMS", "DEVICE", "ENGINE", "MEMORY")
_UNITS = ("Ki", "Mi", "Gi", "Ti", "Pi")


class AdminError(Exception):
    """A failure reported as one line on stderr, with exit status 1."""


@dataclass(frozen=True)
class Target:
    """One router: a URL, or a pod reached through the Kubernetes API server."""

    name: str
    fetch: Fetch
    pod: str | None = None


def http_target(url: str, token: str | None, timeout_s: float, api_key: str | None = None) -> Target:
    """The admin API (`/admin/*`) takes the admin token; every other route takes the API key."""
    base = url.rstrip("/")

    def fetch(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        secret = token if path.startswith("/admin/") else api_key
        headers = {"Accept": "application/json", **({"Authorization": f"Bearer {secret}"} if secret else {})}
        try:
            response = httpx.request(method, base + path, headers=headers, json=body, timeout=timeout_s)
        except httpx.ConnectError as exc:
            raise AdminError(f"cannot connect to {base}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise AdminError(f"{base} did not answer within {timeout_s:g} s") from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise AdminError(f"{base}: {exc}") from exc
        return response.status_code, response.content

    return Target(base, fetch)


def _error_text(status: int, body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return f"HTTP {status}: {body.decode(errors='replace').strip()[:200] or '(empty body)'}"
    detail = data.get("detail", data.get("error", data)) if isinstance(data, dict) else data
    if isinstance(detail, dict) and "message" in detail:  # SIE envelope, or a Kubernetes Status from the proxy
        code = detail.get("code") if isinstance(detail.get("code"), str) else detail.get("reason")
        return f"HTTP {status} {code}: {detail['message']}" if code else f"HTTP {status}: {detail['message']}"
    return f"HTTP {status}: {detail}"


def call(target: Target, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object a router answers, or AdminError on an HTTP error or a body that is not one."""
    status, body = target.fetch(method, path, payload)
    if status >= 400:
        raise AdminError(f"{target.name}: {_error_text(status, body)}")
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise AdminError(f"{target.name}: the answer to {method} {path} is not a JSON object (is this an SIE server?)")
    return data


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value, unit = float(n), ""
    for next_unit in _UNITS:
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{value:.0f}{unit}" if value >= 10 or not unit else f"{value:.1f}".removesuffix(".0") + unit


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"
    for size, unit, sub_size, sub_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "m"), (60, "m", 1, "s")):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size}{unit}{rest}{sub_unit}" if rest else f"{s // size}{unit}"
    raise AssertionError("unreachable")


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def worker_cells(row: dict[str, Any]) -> list[str]:
    state = _text(row.get("state")) + (",pinned" if row.get("pinned") else "")
    memory = f"{human_bytes(row.get('memory_bytes'))}/{human_bytes(row.get('memory_budget_bytes'))}"
    return [_text(row.get("model")), state, _text(row.get("pid")), _text(row.get("device")), memory,
            _text(row.get("queue_depth")), _text(row.get("requests_served")),
            human_duration(row.get("last_used_s_ago")), human_duration(row.get("uptime_s")),
            _text(row.get("restarts", 0)), human_duration(row.get("backoff_s"))]


def device_cells(row: dict[str, Any]) -> list[str]:
    return [_text(row.get("device"))] + [human_bytes(row.get(key)) for key in
                                         ("used_bytes", "total_bytes", "budget_bytes", "reserved_bytes")]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = [header, *rows]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def render_ls(data: dict[str, list[dict[str, Any]]], with_pod: bool) -> str:
    def cells(row: dict[str, Any], fn: Callable[[dict[str, Any]], list[str]]) -> list[str]:
        return ([_text(row.get("pod"))] if with_pod else []) + fn(row)

    pod = ("POD",) if with_pod else ()
    workers = [cells(row, worker_cells) for row in data["workers"]]
    parts = [table(pod + WORKER_COLUMNS, workers) if workers else "No workers."]
    parts += [f"{row.get('model')}: last error: {row['last_error']}" for row in data["workers"]
              if row.get("last_error")]
    if data["devices"]:
        parts += ["", table(pod + DEVICE_COLUMNS, [cells(row, device_cells) for row in data["devices"]])]
    return "\n".join(parts)


def model_cells(row: dict[str, Any]) -> list[str]:
    dims = row.get("dims") or {}
    return [_text(row.get("name")), _text(row.get("family")), _text(row.get("state")),
            ",".join(row.get("outputs") or []) or "-", ",".join(f"{k}:{v}" for k, v in dims.items() if v) or "-",
            _text(row.get("device")), _text(row.get("engine")), human_bytes(row.get("memory_bytes"))]


def render_models(rows: list[dict[str, Any]], with_pod: bool) -> str:
    if not rows:
        return "No models."
    pod = ("POD",) if with_pod else ()
    cells = [([_text(row.get("pod"))] if with_pod else []) + model_cells(row) for row in rows]
    errors = [f"{row.get('name')}: last error: {row['last_error']}" for row in rows if row.get("last_error")]
    return "\n".join([table(pod + MODEL_COLUMNS, cells), *errors])


def _each(targets: Sequence[Target], fn: Callable[[Target], None], err: TextIO) -> int:
    """Runs fn on every target; a failing one is reported and makes the exit status 1, the others still run."""
    status = 0
    for target in targets:
        try:
            fn(target)
        except AdminError as exc:
            print(f"sie-admin: error: {exc}", file=err)
            status = 1
    return status


def workers_ls(targets: Sequence[Target], as_json: bool, out: TextIO, err: TextIO) -> int:
    merged: dict[str, list[dict[str, Any]]] = {"workers": [], "devices": []}

    def collect(target: Target) -> None:
        data = call(target, "GET", "/admin/workers")
        for key in merged:
            merged[key] += [({"pod": target.pod} if target.pod else {}) | row for row in data.get(key) or []]

    status = _each(targets, collect, err)
    if status and not merged["workers"] and not merged["devices"]:
        return status
    with_pod = any(t.pod for t in targets)
    print(json.dumps(merged, indent=2) if as_json else render_ls(merged, with_pod), file=out)
    return status


def models_ls(targets: Sequence[Target], as_json: bool, out: TextIO, err: TextIO) -> int:
    """The models each server serves (its bundle, or its `-m` models), from `/v1/models`: family, state, outputs."""
    rows: list[dict[str, Any]] = []

    def collect(target: Target) -> None:
        data = call(target, "GET", "/v1/models")
        rows.extend(({"pod": target.pod} if target.pod else {}) | row for row in data.get("models") or [])

    status = _each(targets, collect, err)
    if status and not rows:
        return status
    print(json.dumps({"models": rows}, indent=2) if as_json else render_models(rows, any(t.pod for t in targets)),
          file=out)
    return status


class _Interrupt:
    """SIGINT during `watch`: raised (KeyboardInterrupt) only while the watch pauses between listings; during a listing
    only noted, so that the watch ends once that listing is shown. A second SIGINT during a listing exits at once."""

    def __init__(self) -> None:
        self.asked = False
        self.pausing = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.asked and not self.pausing:
            os._exit(130)  # the listing in hand is stuck (its requests wait out --timeout): the operator insists
        self.asked = True
        if self.pausing:
            raise KeyboardInterrupt


def watch(show: Callable[[TextIO, TextIO], int], interval_s: float, out: TextIO, err: TextIO,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Shows the listing every interval until interrupted (Ctrl-C ends it with status 0). On a terminal each one
    replaces the last, as `watch` does; otherwise they follow one another under a time stamp, as a log would.

    Ctrl-C never raises inside a listing, so never inside the HTTP client's code: a CI run once waited 30 s for a watch
    it had interrupted (where the exception then landed is not known). A listing in hand is finished first."""
    tty = out.isatty()
    interrupt = _Interrupt()
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        while not interrupt.asked:
            print("\x1b[H\x1b[2J" if tty else "", end="", file=out)
            print(f"Every {interval_s:g}s: {time.strftime('%Y-%m-%d %H:%M:%S')}\n", file=out)
            show(out, err)
            out.flush()
            interrupt.pausing = True
            try:
                if not interrupt.asked:
                    sleep(interval_s)
            finally:
                interrupt.pausing = False
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def workers_evict(targets: Sequence[Target], model: str, out: TextIO, err: TextIO) -> int:
    def evict(target: Target) -> None:
        data = call(target, "POST", f"/admin/workers/{quote(model, safe='/')}/evict")
        where = f"{target.pod}: " if target.pod else ""
        name = data.get("model", model)
        print(f"{where}evicted {name}" if data.get("evicted") else f"{where}{name} was not loaded", file=out)

    return _each(targets, evict, err)


def models_add(targets: Sequence[Target], args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Register a model on every target (each pod of a pool, with --namespace/--selector)."""
    payload = {"model": args.model, **({"adapter": args.adapter} if args.adapter else {}),
               **({"served_model_name": args.served_model_name} if args.served_model_name else {}),
               **({"load": True} if args.load else {})}

    def add(target: Target) -> None:
        data = call(target, "POST", "/admin/models", payload)
        where = f"{target.pod}: " if target.pod else ""
        print(f"{where}added {data.get('model')} ({data.get('family')}, {data.get('state')})", file=out)

    return _each(targets, add, err)


def models_rm(targets: Sequence[Target], model: str, out: TextIO, err: TextIO) -> int:
    def remove(target: Target) -> None:
        data = call(target, "DELETE", f"/admin/models/{quote(model, safe='/')}")
        where = f"{target.pod}: " if target.pod else ""
        print(f"{where}removed {data.get('model', model)}", file=out)

    return _each(targets, remove, err)


def add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes. They are declared on each command too, with suppressed defaults, so that
    they go anywhere on the line (`sie-admin workers ls --url U` == `sie-admin --url U workers ls`, as kubectl does)
    and a command's own parse never resets one given before it."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument("--url", default=default(os.environ.get("SIE_URL", "http://127.0.0.1:8080")),
                        help="SIE server to manage (default $SIE_URL or http://127.0.0.1:8080)")
    parser.add_argument("--token", default=default(os.environ.get("SIE_ADMIN_TOKEN")),
                        help="admin token of the server, for /admin/* (default $SIE_ADMIN_TOKEN)")
    parser.add_argument("--api-key", default=default(os.environ.get("SIE_API_KEY")),
                        help="API key of the server, for `models ls` (default $SIE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=default(10.0),
                        help="seconds to wait for each answer (default 10)")
    k8s = parser.add_argument_group("Kubernetes", "query every Running router pod through the API server's pod proxy")
    k8s.add_argument("--namespace", "-n", default=default(None), help="namespace of the SIE deployment")
    k8s.add_argument("--selector", "-l", default=default(None),
                     help="label selector of the router pods, e.g. app.kubernetes.io/name=sie")
    k8s.add_argument("--port", type=int, default=default(8080), help="router port in the pod (default 8080)")
    k8s.add_argument("--kubeconfig", default=default(None),
                     help="kubeconfig file (default $KUBECONFIG, ~/.kube/config, or in-cluster)")
    k8s.add_argument("--context", default=default(None), help="kubeconfig context (default: the current one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sie-admin", description=__doc__.split("\n\n")[0].replace("\n", " "))
    add_global_options(parser, top=True)
    commands = parser.add_subparsers(dest="group", required=True, title="commands", metavar="COMMAND")

    def command(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, **kwargs)
        add_global_options(sub, top=False)
        return sub

    workers = command(commands, "workers", help="list (ls) or evict model workers").add_subparsers(
        dest="command", required=True)
    ls = command(workers, "ls", help="table of workers: state, memory, queue, requests, idle time, uptime")
    ls.add_argument("--json", action="store_true", help="print the same data as JSON")
    ls.add_argument("--watch", "-w", action="store_true", help="show the table again every --interval until Ctrl-C")
    ls.add_argument("--interval", type=float, default=2.0, help="seconds between tables with --watch (default 2)")
    evict = command(workers, "evict", help="stop a model's worker and free its memory")
    evict.add_argument("model", metavar="MODEL", help="model name as in /v1/models")
    models = command(commands, "models", help="list (ls), add or remove (rm) the models served").add_subparsers(
        dest="command", required=True)
    models_list = command(models, "ls",
                          help="table of the models served: family, state, outputs, device, engine, memory")
    models_list.add_argument("--json", action="store_true", help="print the same data as JSON")
    add = command(models, "add", help="serve another model now (POST /admin/models); lost at the server's restart "
                                      "unless it runs with --model-store")
    add.add_argument("model", metavar="ID", help="a bundle id, a hub id or a folder on the server")
    add.add_argument("--adapter", metavar="FAMILY", help="its adapter family, when its files do not say it")
    add.add_argument("--served-model-name", metavar="NAME", help="the name it answers under")
    add.add_argument("--load", action="store_true", help="load it now and wait (set --timeout for a long load)")
    rm = command(models, "rm", help="drain, evict and unregister a model (DELETE /admin/models/ID)")
    rm.add_argument("model", metavar="ID", help="the model's name as served")
    return parser


def targets_from(args: argparse.Namespace, cleanup: ExitStack) -> list[Target]:
    if args.namespace is None and args.selector is None:
        return [http_target(args.url, args.token, args.timeout, args.api_key)]
    if not (args.namespace and args.selector):
        raise AdminError("--namespace and --selector go together")
    from sie_sdk.admin_k8s import discover

    return discover(args.namespace, args.selector, port=args.port, kubeconfig=args.kubeconfig,
                    context=args.context, token=args.token, timeout_s=args.timeout, cleanup=cleanup)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    args = build_parser().parse_args(argv)
    with ExitStack() as cleanup:
        try:
            targets = targets_from(args, cleanup)
        except AdminError as exc:
            print(f"sie-admin: error: {exc}", file=err)
            return 1
        if args.group == "models":
            if args.command == "add":
                return models_add(targets, args, out, err)
            if args.command == "rm":
                return models_rm(targets, args.model, out, err)
            return models_ls(targets, args.json, out, err)
        if args.command == "evict":
            return workers_evict(targets, args.model, out, err)
        if args.watch:
            if args.interval <= 0:
                print("sie-admin: error: --interval must be above 0", file=err)
                return 2
            return watch(lambda o, e: workers_ls(targets, args.json, o, e), args.interval, out, err)
        return workers_ls(targets, args.json, out, err)


if __name__ == "__main__":  # `python -m sie_sdk.admin`: run the imported module, whose classes admin_k8s shares
    from sie_sdk.admin import main as imported_main

    sys.exit(imported_main())
