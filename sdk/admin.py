"""`sie-admin`: list and evict the model workers of one SIE server (`--url`) or of every router pod of a Kubernetes
deployment (`--namespace/--selector`, through the API server's pod proxy)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import quote

import httpx

# (method, path under the router root) -> (HTTP status, body)
Fetch = Callable[[str, str], tuple[int, bytes]]

WORKER_COLUMNS = ("MODEL", "STATE", "PID", "DEVICE", "MEMORY", "QUEUE", "SERVED", "LAST-USED", "UPTIME")
DEVICE_COLUMNS = ("DEVICE", "USED", "TOTAL", "BUDGET", "RESERVED")
_UNITS = ("Ki", "Mi", "Gi", "Ti", "Pi")


class AdminError(Exception):
    """A failure reported as one line on stderr, with exit status 1."""


@dataclass(frozen=True)
class Target:
    """One router: a URL, or a pod reached through the Kubernetes API server."""

    name: str
    fetch: Fetch
    pod: str | None = None


def http_target(url: str, token: str | None, timeout_s: float) -> Target:
    base = url.rstrip("/")
    headers = {"Accept": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}

    def fetch(method: str, path: str) -> tuple[int, bytes]:
        try:
            response = httpx.request(method, base + path, headers=headers, timeout=timeout_s)
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


def call(target: Target, method: str, path: str) -> dict[str, Any]:
    """The JSON object a router answers, or AdminError on an HTTP error or a body that is not one."""
    status, body = target.fetch(method, path)
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
            human_duration(row.get("last_used_s_ago")), human_duration(row.get("uptime_s"))]


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


def workers_evict(targets: Sequence[Target], model: str, out: TextIO, err: TextIO) -> int:
    def evict(target: Target) -> None:
        data = call(target, "POST", f"/admin/workers/{quote(model, safe='/')}/evict")
        where = f"{target.pod}: " if target.pod else ""
        name = data.get("model", model)
        print(f"{where}evicted {name}" if data.get("evicted") else f"{where}{name} was not loaded", file=out)

    return _each(targets, evict, err)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sie-admin", description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--url", default=os.environ.get("SIE_URL", "http://127.0.0.1:8080"),
                        help="SIE server to manage (default $SIE_URL or http://127.0.0.1:8080)")
    parser.add_argument("--token", default=os.environ.get("SIE_ADMIN_TOKEN"),
                        help="admin token of the server (default $SIE_ADMIN_TOKEN)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer (default 10)")
    k8s = parser.add_argument_group("Kubernetes", "query every Running router pod through the API server's pod proxy")
    k8s.add_argument("--namespace", "-n", help="namespace of the SIE deployment")
    k8s.add_argument("--selector", "-l", help="label selector of the router pods, e.g. app.kubernetes.io/name=sie")
    k8s.add_argument("--port", type=int, default=8080, help="router port in the pod (default 8080)")
    k8s.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG, ~/.kube/config, or in-cluster)")
    k8s.add_argument("--context", help="kubeconfig context (default: the current one)")
    commands = parser.add_subparsers(dest="group", required=True, title="commands", metavar="COMMAND")
    workers_parser = commands.add_parser("workers", help="list (ls) or evict model workers")
    workers = workers_parser.add_subparsers(dest="command", required=True)
    ls = workers.add_parser("ls", help="table of workers: state, memory, queue, requests, idle time, uptime")
    ls.add_argument("--json", action="store_true", help="print the same data as JSON")
    evict = workers.add_parser("evict", help="stop a model's worker and free its memory")
    evict.add_argument("model", metavar="MODEL", help="model name as in /v1/models")
    return parser


def targets_from(args: argparse.Namespace, cleanup: ExitStack) -> list[Target]:
    if args.namespace is None and args.selector is None:
        return [http_target(args.url, args.token, args.timeout)]
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
        if args.command == "ls":
            return workers_ls(targets, args.json, out, err)
        return workers_evict(targets, args.model, out, err)


if __name__ == "__main__":  # `python -m sie_sdk.admin`: run the imported module, whose classes admin_k8s shares
    from sie_sdk.admin import main as imported_main

    sys.exit(imported_main())
