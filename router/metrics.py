"""Prometheus metrics (router process), served at `/metrics`. The names are an interface: the Helm chart's KEDA
query and the Grafana dashboards in deploy/ depend on them, and tests/deploy checks every dashboard against this module.

- `sie_queue_depth{model}` gauge: items admitted and waiting for a batch (the autoscaling signal).
- `sie_requests_total{model,endpoint,status}` counter: requests answered here; `status` is the HTTP code ("200", "429").
- `sie_forwarded_requests_total{model,endpoint,status}` counter: requests relayed to the pool that serves their model,
  by the status relayed back (503: that pool did not answer, e.g. at zero replicas: KEDA's wake signal). A request
  is counted once in sie_requests_total, by the pool that answers it, so sums over pools do not count it twice.
- `sie_request_duration_seconds{model,endpoint,phase}` histogram: phase in queue|tokenize|inference|postprocess|total.
- `sie_batch_size{model}` histogram: items per forward pass.
- `sie_tokens_total{model}` counter: input tokens processed.
- `sie_models_loaded{device}` gauge: models loaded in workers on each device ("cuda:0", "cpu").
- `sie_model_memory_bytes{model,device}` gauge: memory the ledger accounts to each loaded model.
- `sie_model_loads_total{model,result}` counter: model loads; `result` in success|failure.
- `sie_model_load_duration_seconds{model}` histogram: time from starting a worker to the model being ready.
- `sie_evictions_total{model,reason}` counter: unloads; `reason` in memory|idle|admin.
- `sie_worker_restarts_total{model}` counter: worker processes that exited unexpectedly and were restarted.
- `sie_worker_hangs_total{model}` counter: workers killed for letting a batch outlive its deadline, leaving a ping
  unanswered (frozen), or sending garbage.
- `sie_device_memory_used_bytes{device}` gauge: memory in use per GPU, or host memory on CPU (device "cpu").
- `sie_device_memory_total_bytes{device}` gauge: memory per GPU, or host memory (or the budget) on CPU.
- `http_requests_total{handler,method,status}` counter: Infinity-compatible; `status` grouped as 2xx|4xx|5xx.
- `http_request_duration_seconds{handler,method}` histogram: Infinity-compatible, per route template.

prometheus-client's standard families describe the router process itself (not its workers): `process_*` (CPU
seconds, resident and virtual memory, open file descriptors, start time) and `python_gc_*{generation}`.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)
# The router's own CPU, memory and file descriptors (process_*) and its garbage collections (python_gc_*), read at
# scrape time only: what an operator checks first when the router, not a model, is the slow part.
prometheus_client.ProcessCollector(registry=REGISTRY)
prometheus_client.GCCollector(registry=REGISTRY)
# The classic text format, which every scraper reads; prometheus-client's newer default announces version 1.0.0.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PHASES = ("queue", "tokenize", "inference", "postprocess", "total")
LOAD_RESULTS = ("success", "failure")
EVICTION_REASONS = ("memory", "idle", "admin")

# Inference requests on small models take milliseconds; a cold load or a long queue can take a minute.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# prometheus-fastapi-instrumentator's defaults, which Infinity exports.
_HTTP_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 7.5,
                 10.0, 30.0, 60.0)

QUEUE_DEPTH = Gauge("sie_queue_depth", "Items admitted and waiting for a batch.", ["model"], registry=REGISTRY)
REQUESTS = Counter("sie_requests", "Requests answered, by HTTP status code.", ["model", "endpoint", "status"],
                   registry=REGISTRY)
FORWARDED = Counter("sie_forwarded_requests", "Requests relayed to the pool that serves their model, by the HTTP "
                    "status relayed back.", ["model", "endpoint", "status"], registry=REGISTRY)
REQUEST_DURATION = Histogram("sie_request_duration_seconds", "Request time by phase "
                             "(queue, tokenize, inference, postprocess, total).", ["model", "endpoint", "phase"],
                             buckets=_LATENCY_BUCKETS, registry=REGISTRY)
BATCH_SIZE = Histogram("sie_batch_size", "Items per forward pass.", ["model"], buckets=_BATCH_BUCKETS,
                       registry=REGISTRY)
TOKENS = Counter("sie_tokens", "Input tokens processed.", ["model"], registry=REGISTRY)
MODELS_LOADED = Gauge("sie_models_loaded", "Models loaded in workers, per device.", ["device"], registry=REGISTRY)
MODEL_MEMORY = Gauge("sie_model_memory_bytes", "Memory accounted to a loaded model.", ["model", "device"],
                     registry=REGISTRY)
MODEL_LOADS = Counter("sie_model_loads", "Model loads, by result (success, failure, refused for memory).",
                      ["model", "result"], registry=REGISTRY)
MODEL_LOAD_DURATION = Histogram("sie_model_load_duration_seconds", "Time to start a worker and load its model.",
                                ["model"], buckets=_LOAD_BUCKETS, registry=REGISTRY)
EVICTIONS = Counter("sie_evictions", "Models unloaded, by reason (memory, idle, admin).", ["model", "reason"],
                    registry=REGISTRY)
WORKER_RESTARTS = Counter("sie_worker_restarts", "Workers restarted after an unexpected exit.", ["model"],
                          registry=REGISTRY)
WORKER_HANGS = Counter("sie_worker_hangs", "Workers killed for missing a batch deadline, leaving a ping unanswered "
                       "or sending garbage.", ["model"], registry=REGISTRY)
DEVICE_MEMORY_USED = Gauge("sie_device_memory_used_bytes", "Memory in use per GPU, or host memory on CPU.",
                           ["device"], registry=REGISTRY)
DEVICE_MEMORY_TOTAL = Gauge("sie_device_memory_total_bytes", "Memory per GPU, or host memory on CPU.", ["device"],
                            registry=REGISTRY)
HTTP_REQUESTS = Counter("http_requests", "Requests by route template, method and status class (Infinity-compatible).",
                        ["handler", "method", "status"], registry=REGISTRY)
HTTP_REQUEST_DURATION = Histogram("http_request_duration_seconds", "Request time by route template and method "
                                  "(Infinity-compatible).", ["handler", "method"], buckets=_HTTP_BUCKETS,
                                  registry=REGISTRY)


def status_class(code: int) -> str:
    """200 -> "2xx": the `status` label of `http_requests_total`."""
    return f"{code // 100}xx"


def render() -> tuple[bytes, str]:
    """The exposition of every SIE metric, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE
