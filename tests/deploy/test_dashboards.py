"""Grafana dashboards checked offline: every expression parses as PromQL once Grafana's variables are substituted and
refers only to metrics that sie_router.metrics defines; together the panels show every sie_ metric."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest

from sie_router import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
# What Grafana substitutes before sending a query; `$__rate_interval` is at least four scrape intervals.
VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "${model}": "m", "$model": "m"}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported() -> dict[str, str]:
    """Series name -> metric family, as `/metrics` exposes them (counters end in _total, histograms have three)."""
    return {family.name + suffix: family.name for family in metrics.REGISTRY.collect()
            for suffix in SUFFIXES[family.type]}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found += panels(panel) if panel["type"] == "row" else [panel]
    return found


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def selected_metrics(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(substitute(expr)), visit)
    return names


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


def test_there_are_dashboards() -> None:
    assert DASHBOARDS, "deploy/grafana/*.json"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dashboard = load(path)
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["model"]["multi"] and variables["model"]["includeAll"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert panel["title"] and panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_expression_parses_and_uses_only_exported_metrics(path: Path) -> None:
    names = exported()
    for expr in exprs(load(path)):
        used = selected_metrics(expr)
        assert used, expr
        assert used <= names.keys(), f"{expr!r} uses {sorted(used - names.keys())}, which the server does not export"
        # Rates over Grafana's interval, so that no panel is blank at a long scrape interval.
        assert set(re.findall(r"\[([^\]]+)\]", expr)) <= {"$__rate_interval"}, expr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_model_variable_query_uses_an_exported_metric(path: Path) -> None:
    (model,) = [v for v in load(path)["templating"]["list"] if v["name"] == "model"]
    match = re.fullmatch(r"label_values\((\w+), model\)", model["query"]["query"])
    assert match and match.group(1) in exported()


def test_dashboards_cover_every_sie_metric() -> None:
    names = exported()
    used = {names[m] for path in DASHBOARDS for expr in exprs(load(path)) for m in selected_metrics(expr)}
    defined = {family for family in names.values() if family.startswith("sie_")}
    assert defined <= used, f"no panel shows {sorted(defined - used)}"


def test_metrics_module_defines_the_documented_names() -> None:
    names = set(exported())
    expected = {"sie_queue_depth", "sie_requests_total", "sie_batch_size_bucket", "sie_tokens_total",
                "sie_request_duration_seconds_bucket", "sie_models_loaded", "sie_model_memory_bytes",
                "sie_model_loads_total", "sie_model_load_duration_seconds_bucket", "sie_evictions_total",
                "sie_worker_restarts_total", "sie_device_memory_used_bytes", "sie_device_memory_total_bytes",
                "http_requests_total", "http_request_duration_seconds_bucket"}
    assert expected <= names
    doc = metrics.__doc__ or ""
    standard = ("process_", "python_gc_")  # prometheus-client's own families, documented as a group
    assert {"process_cpu_seconds", "python_gc_collections"} <= set(exported().values())
    assert all(f"`{prefix}*" in doc for prefix in standard)
    for family in {f for f in exported().values() if not f.startswith(standard)}:
        series = family + ("_total" if family + "_total" in names else "")
        assert f"`{series}{{" in doc, f"{series} is not listed in the sie_router.metrics docstring"
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"# TYPE sie_queue_depth gauge" in body


def test_metric_labels() -> None:
    labels = {"sie_queue_depth": ("model",), "sie_requests": ("model", "endpoint", "status"),
              "sie_request_duration_seconds": ("model", "endpoint", "phase"), "sie_models_loaded": ("device",),
              "sie_model_memory_bytes": ("model", "device"), "sie_evictions": ("model", "reason"),
              "http_requests": ("handler", "method", "status"), "http_request_duration_seconds": ("handler", "method")}
    by_name = {m._name: m for m in vars(metrics).values() if hasattr(m, "_labelnames")}
    for name, expected in labels.items():
        assert by_name[name]._labelnames == expected, name
    assert metrics.status_class(404) == "4xx"
