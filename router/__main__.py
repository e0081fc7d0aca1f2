"""`sie-server serve`: parse the command line (Infinity's flags included), build the app, run it under uvicorn."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import setproctitle
import uvicorn

from sie_router import __version__
from sie_router.app import build_app
from sie_router.models.registry import Origin, Registry, build_registry, runtime_config
from sie_router.models.store import ModelStore
from sie_router.models.weights import WeightsNotFound
from sie_router.pool.devices import NoDevice
from sie_router.settings import (
    DEFAULT_BUNDLE,
    DEFAULT_MODEL,
    Settings,
    build_settings,
    choices,
    env_defaults,
    parse_bytes,
)
from sie_router.telemetry import configure_logging

log = logging.getLogger("sie")

EPILOG = f"""examples:
  sie-server serve                          serve the default bundle, loading each model on first use
  sie-server serve -m {DEFAULT_MODEL}
  sie-server serve -m ./my-model-dir --port 9000
  sie-server serve --model-id BAAI/bge-small-en-v1.5   (Infinity's flag works too)

Models are found offline first: a local folder, the Hugging Face cache, a package that ships the weights,
then a hub download (HF_ENDPOINT, HF_TOKEN and HF_HOME apply) unless --offline or HF_HUB_OFFLINE=1.
A model outside the bundle gets its adapter family from its files; --adapter names it when they do not say.
Every flag also reads an SIE_* variable (see README)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sie-server", description="SIE: embeddings, reranking and extraction for many "
                                "models behind one server.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"sie {__version__}")
    sub = p.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the HTTP server", epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("-m", "--model", "--model-id", dest="models", action="append", default=[], metavar="MODEL",
                       help="serve this model and load it at start (repeatable): a bundle id, a hub id or a local "
                            "folder. Without -m, the whole bundle is served and loaded on first use")
    serve.add_argument("--served-model-name", dest="served_names", action="append", default=[], metavar="NAME",
                       help="the name the i-th -m model answers under on every API (repeatable, paired with -m in "
                            "order), as Infinity, TEI and vLLM offer")
    serve.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="FAMILY",
                       help="the adapter family of the i-th -m model when its files do not say it (repeatable, "
                            "paired with -m in order; 'auto' infers): dense, sparse, multivector, hybrid, "
                            "cross_encoder, classifier, ner, gliner or clip")
    serve.add_argument("--offline", dest="hf_offline", action="store_const", const=True,
                       help="never download: models come from folders, the Hugging Face cache and packages only "
                            "(as HF_HUB_OFFLINE=1)")
    serve.add_argument("--trust-remote-code", action="store_const", const=True,
                       help="run the custom code a checkpoint's config names (auto_map: NomicBERT, jina, ...), on the "
                            "torch engine; without it such a model is refused (default: off)")
    serve.add_argument("--url-prefix", help="also serve the Infinity routes under this prefix, e.g. /v1 "
                                            "(Infinity's --url-prefix)")
    serve.add_argument("--preload", action="append", default=[], metavar="MODEL",
                       help="load this bundle model at start (repeatable)")
    serve.add_argument("--bundle", help=f"bundle name under bundles/, or a folder of model YAML files "
                                        f"(default: {DEFAULT_BUNDLE})")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; use 0.0.0.0 to expose it)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--device", metavar=_one_of("device"), help="where workers run (default auto: a GPU "
                                                                          "when NVML finds one, else the CPU)")
    serve.add_argument("--engine", metavar=_one_of("engine"),
                       help="the CPU engine of dense, sparse (SPLADE), ColBERT, BGE-M3, cross-encoder and classifier "
                            "models: auto (a worker without torch serving the graph exported "
                            "and cached at first load, under OpenVINO in bf16 where the CPU has it natively, else ONNX "
                            "Runtime), openvino, onnx (ONNX Runtime in float32; Infinity's 'optimum' means the same) "
                            "or torch; GPUs always run torch (default auto)")
    serve.add_argument("--dtype", metavar=_one_of("dtype"),
                       help="compute precision for every model, over each model config's own (default auto: the "
                            "config's, else float32; models under OpenVINO take bf16 where the CPU has it, "
                            "checked at load); float16 is for GPUs")
    serve.add_argument("--worker-threads", type=int, help="torch threads per worker (default: all cores)")
    serve.add_argument("--onnx-lanes", type=int, metavar="N",
                       help="lean dense workers: forward calls side by side (ONNX Runtime calls of worker threads / N "
                            "threads each, default one thread each; OpenVINO streams, default 1)")
    serve.add_argument("--max-batch-items", type=int,
                       help="most items in one batch (default on CPU: 64 joined from separate requests, 256 of one "
                            "client batch; on GPUs the token budget decides)")
    serve.add_argument("--max-wait-ms", type=float,
                       help="while the worker is busy, how long a batch waits to fill until the worker's pace is "
                            "learned; after that it leaves just before the worker needs it (default 2; 0 never waits)")
    serve.add_argument("--memory-budget", type=parse_bytes, metavar="SIZE",
                       help="host memory workers may use on CPU, e.g. 8GiB (default: 80%% of RAM); least recently "
                            "used idle models are evicted to stay under it")
    serve.add_argument("--gpu-memory-fraction", type=float, metavar="F",
                       help="share of each GPU's memory workers may use (default 0.9)")
    serve.add_argument("--pin", dest="pinned", action="append", default=[], metavar="MODEL",
                       help="never evict this model (repeatable)")
    serve.add_argument("--idle-ttl", dest="idle_ttl_s", type=float, metavar="SECONDS",
                       help="evict models unused this long (default: never)")
    serve.add_argument("--batch-timeout", dest="batch_timeout_s", type=float, metavar="SECONDS",
                       help="a worker whose batch makes no progress this long is hung: killed and restarted (default "
                            "30; sooner for models whose batches are fast: 20 times their pace, at least 10)")
    serve.add_argument("--restart-backoff-max", dest="restart_backoff_max_s", type=float, metavar="SECONDS",
                       help="a worker that died or hung is replaced after a back-off that starts at 0.5 s and doubles "
                            "with each crash in a row, up to this (default 10)")
    serve.add_argument("--restart-backoff-reset", dest="restart_backoff_reset_s", type=float, metavar="SECONDS",
                       help="a worker that served this long before it crashed starts the back-off again from 0.5 s "
                            "(default 30)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but health, metrics "
                                         "and docs (prefer SIE_API_KEY: command lines are visible to other users)")
    serve.add_argument("--admin-token", help="require this bearer token on the admin API, which never takes the API "
                                             "key (prefer SIE_ADMIN_TOKEN)")
    serve.add_argument("--log-level", metavar=_one_of("log_level"))
    add_operator_flags(serve)
    add_tei_flags(serve)
    return p


def _one_of(field: str) -> str:
    """A closed setting's values, as argparse shows choices: its flag takes any text, and `build_settings` checks it
    against the same values as the variable's, with the same message."""
    return "{" + ",".join(choices(field)) + "}"


def _flag_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return text.lower() in ("true", "1")


# TEI flags we cannot honour, and why: a migrating user learns at start, not from odd answers later.
TEI_UNSUPPORTED = {
    "--pooling": "pooling comes from the model's 1_Pooling config or its SIE model config (adapter_options)",
    "--revision": "pin a revision in the model's SIE config (hf_revision)",
    "--max-batch-tokens": "the token budget is per model: max_batch_tokens in its SIE config",
    "--tokenization-workers": "each worker tokenizes on its own prepare thread",
    "--dense-path": "every Dense module the model's modules.json lists is applied, in order",
    "--hf-token": "set HF_TOKEN in the environment", "--hf-api-token": "set HF_TOKEN in the environment",
    "--huggingface-hub-cache": "set HF_HUB_CACHE in the environment",
    "--prometheus-port": "metrics are served at /metrics on the main port",
    "--uds-path": "listen on a TCP port (--host, --port)",
}


class _Unsupported(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option: str | None = None) -> None:
        parser.error(f"{option} is a text-embeddings-inference flag that SIE does not support: "
                     f"{TEI_UNSUPPORTED[str(option)]}")


def add_operator_flags(serve: argparse.ArgumentParser) -> None:
    """Logs, traces, CORS and the runtime model store (TEI's and Infinity's flags where they have one)."""
    ops = serve.add_argument_group("logs, tracing, CORS and runtime models")
    ops.add_argument("--json-output", dest="log_format", action="store_const", const="json",
                     help="log one JSON object a line (time, level, logger, message; model, request id and trace id "
                          "where there is one), in the router and every worker (as SIE_LOG_FORMAT=json)")
    ops.add_argument("--access-log", action="store_const", const=True,
                     help="log one line per HTTP request (uvicorn's access log), with its request id")
    ops.add_argument("--otlp-endpoint", metavar="URL",
                     help="export OpenTelemetry traces over OTLP/HTTP (protobuf) to this collector, e.g. "
                          "http://otel-collector:4318 (/v1/traces is appended); OTEL_EXPORTER_OTLP_ENDPOINT works too. "
                          "Default: off")
    ops.add_argument("--otlp-service-name", metavar="NAME",
                     help="the service name of the exported spans (default sie, or OTEL_SERVICE_NAME)")
    ops.add_argument("--cors-allow-origin", dest="cors_allow_origins", action="append", default=[],
                     metavar="ORIGIN", help="let browser pages from this origin call the API (repeatable), e.g. "
                                            "https://app.example.com; default: no cross-origin access")
    ops.add_argument("--permissive-cors", action="store_const", const=True,
                     help="let pages from any origin call the API (Infinity's flag; never with credentials)")
    ops.add_argument("--model-store", type=Path, metavar="FILE",
                     help="keep the models added at runtime (POST /admin/models, sie-admin models add) in this JSON "
                          "file, written atomically, and register them again at start (default: lost at restart)")


def add_tei_flags(serve: argparse.ArgumentParser) -> None:
    """The flags a migrating TEI user passes (`--model-id` is `-m`; `--api-key`, `--port`, `--dtype` are shared)."""
    tei = serve.add_argument_group("text-embeddings-inference flags")
    tei.add_argument("--tei-model", dest="tei_models", action="append", default=[], metavar="MODEL",
                     help="answer TEI's root routes (/embed, /rerank, /predict, ...) with this model for its type "
                          "(repeatable; default: the first served model of each type)")
    tei.add_argument("--auto-truncate", nargs="?", const=True, type=_flag_bool, metavar="BOOL",
                     help="truncate over-long inputs when a TEI request does not say (default true)")
    tei.add_argument("--max-client-batch-size", type=int, metavar="N", help="inputs per TEI request (default 32)")
    tei.add_argument("--payload-limit", dest="max_request_bytes", type=int, metavar="BYTES",
                     help="largest request body (TEI's name for SIE_MAX_REQUEST_BYTES)")
    prompts = tei.add_mutually_exclusive_group()
    prompts.add_argument("--default-prompt-name", metavar="NAME",
                         help="prompt from the model's sentence-transformers config put before every TEI text input")
    prompts.add_argument("--default-prompt", metavar="TEXT", help="text put before every TEI text input")
    tei.add_argument("--hostname", dest="host", help="TEI's name for --host")
    tei.add_argument("--max-concurrent-requests", dest="max_queue_items", type=int, metavar="N",
                     help="TEI's name for the per-model queue bound; past it TEI routes answer 429 Overloaded")
    tei.add_argument("--max-batch-requests", dest="max_batch_items", type=int, metavar="N",
                     help="TEI's name for --max-batch-items")
    for flag in TEI_UNSUPPORTED:
        tei.add_argument(flag, action=_Unsupported, nargs="?", help=argparse.SUPPRESS)


def settings_from(argv: Sequence[str]) -> Settings:
    argv = list(argv)
    if argv and argv[0] == "v2":  # Infinity's `infinity_emb v2 ...`
        argv[0] = "serve"
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve", *argv]
    args = parser().parse_args(argv)
    if args.command != "serve":
        parser().print_help()
        sys.exit(2)
    values = env_defaults()
    given = {k: v for k, v in vars(args).items() if v not in (None, []) and k != "command"}
    if "models" in given:
        given["models"] = tuple(given["models"])
    for name in ("preload", "pinned", "tei_models", "served_names", "adapters", "cors_allow_origins"):
        if name in given:
            given[name] = tuple(given[name])
    values.update(given)
    if given.get("hf_offline"):
        values["extra_env"] = {**values.get("extra_env", {}), "HF_HUB_OFFLINE": "1"}  # type: ignore[dict-item]
    try:  # a field the command line gave is named by its flag in an error (by convention `--foo-bar`)
        return build_settings(values, {name: FLAG_OF.get(name, "--" + name.replace("_", "-")) for name in given})
    except ValueError as exc:
        parser().error(str(exc))


# Settings whose flag is not `--<field>` (repeatable flags are singular, and some keep another server's name).
FLAG_OF = {"cors_allow_origins": "--cors-allow-origin", "log_format": "--json-output", "served_names":
           "--served-model-name", "adapters": "--adapter", "pinned": "--pin", "tei_models": "--tei-model"}


def hide_secrets(argv: Sequence[str]) -> list[str]:
    """The command line with the values of secret flags masked."""
    out, hide = [], False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        out.append("***" if hide else f"{flag}=***" if eq and flag in _SECRET_FLAGS else arg)
        hide = arg in _SECRET_FLAGS
    return out


_SECRET_FLAGS = ("--api-key", "--admin-token")


# Container allocations between young-generation collections (CPython's default is 700). At the default, with the
# whole startup heap in the older generations, the collector took a fifth of the router's CPU at c32 (py-spy --native
# on the router under bench's c32 load).
GC_YOUNG_THRESHOLD = 10_000


def _settle_heap() -> None:
    """Keep the garbage collector off the hot path: the modules, routes and settings loaded at start live until exit,
    so they are moved out of the collector's sight (`gc.freeze`), and young collections run less often.

    A/B at c32, one sitting, 3 rounds each: router CPU 311 µs a request as before, 282 frozen, 261 frozen with the
    higher threshold (bench/README.md); thresholds past 10 000 measured no better."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def main(argv: Sequence[str] | None = None) -> None:
    settings = settings_from(sys.argv[1:] if argv is None else argv)
    for secret in ("SIE_API_KEY", "SIE_ADMIN_TOKEN"):
        os.environ.pop(secret, None)  # read once into Settings; workers, which inherit the environment, never need them
    if argv is None and any(a.partition("=")[0] in _SECRET_FLAGS for a in sys.argv):
        # /proc/<pid>/cmdline is world-readable: overwrite the key given on the command line.
        setproctitle.setproctitle(" ".join(hide_secrets([sys.executable, *sys.argv])))
    configure_logging(settings)
    # hub downloads log their progress themselves (router/models/hub.py)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    registry = startup_registry(settings)
    register_stored(settings, registry)
    log.info("SIE %s on http://%s:%d serving %s", __version__, settings.host, settings.port,
             ", ".join(registry.served) or "no models")
    try:
        app = build_app(settings, registry)
    except NoDevice as exc:  # --device cuda on a host without a usable GPU
        log.error("cannot start: %s", exc)
        sys.exit(1)
    _settle_heap()
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_deadline_s), http="httptools", loop="uvloop",
        log_config=None, access_log=settings.access_log))  # uvicorn's loggers write through ours
    app.state.sie.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
    failure = app.state.sie.startup_failure
    if failure:
        log.error("cannot start: %s", failure)
        sys.exit(1)
    if not server.started:  # the port could not be bound, or the lifespan failed (as uvicorn.run exits)
        sys.exit(3)


STARTUP_RETRIES = 3  # transient hub failures (overloaded, down mid-download) while inferring an -m model's config


def startup_registry(settings: Settings) -> Registry:
    """The registry, the configs of `-m` models outside the bundle inferred from their files (downloaded if need be).

    A permanent failure (not found, unknown family, bad config) exits non-zero with one paragraph and no traceback;
    a transient one is retried with backoff."""
    for attempt in range(STARTUP_RETRIES + 1):
        try:
            return build_registry(settings.bundle, settings.bundle_dirs, settings.models, offline=settings.hf_offline,
                                  served_names=settings.served_names, adapters=settings.adapters)
        except WeightsNotFound as exc:
            if not exc.transient or attempt == STARTUP_RETRIES:
                log.error("cannot start: %s", exc)
                sys.exit(1)
            log.warning("%s; retrying in %ds", exc, 2 ** (attempt + 1))
            time.sleep(2 ** (attempt + 1))
        except (ValueError, OSError) as exc:
            log.error("cannot start: %s", exc)
            sys.exit(1)
    raise AssertionError("unreachable")


def register_stored(settings: Settings, registry: Registry) -> None:
    """The runtime models of `--model-store`, registered again (and loaded at start where they asked to be). One that
    cannot be registered now is logged and skipped, and stays in the file; an unreadable file stops the start."""
    try:
        stored = ModelStore(settings.model_store).models.values()
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(1)
    for request in stored:
        try:
            config = runtime_config(registry, request, offline=settings.hf_offline)
            registry.add(config, Origin.RUNTIME)
        except (ValueError, WeightsNotFound) as exc:
            log.error("the stored model %s is not served: %s", request.name, exc)
            continue
        if request.load:
            registry.load_at_start.append(config.sie_id)
        log.info("model %s registered from the model store %s", config.sie_id, settings.model_store)


if __name__ == "__main__":
    main()
