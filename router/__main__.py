"""`sie-server serve`: parse the command line (Infinity's flags included), build the app, run it under uvicorn."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from collections.abc import Sequence

import setproctitle
import uvicorn

from sie_router import __version__
from sie_router.app import build_app
from sie_router.registry import Registry, build_registry
from sie_router.settings import DEFAULT_BUNDLE, DEFAULT_MODEL, DTYPES, Settings, env_defaults, parse_bytes
from sie_router.weights import WeightsNotFound

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
    serve.add_argument("--url-prefix", help="also serve the Infinity routes under this prefix, e.g. /v1 "
                                            "(Infinity's --url-prefix)")
    serve.add_argument("--preload", action="append", default=[], metavar="MODEL",
                       help="load this bundle model at start (repeatable)")
    serve.add_argument("--bundle", help=f"bundle name under bundles/, or a folder of model YAML files "
                                        f"(default: {DEFAULT_BUNDLE})")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; use 0.0.0.0 to expose it)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where workers run (default auto: a GPU "
                                                                          "when NVML finds one, else the CPU)")
    serve.add_argument("--engine", choices=["torch", "onnx", "auto", "optimum"],
                       help="dense encoders' engine on CPU: torch, onnx (ONNX Runtime, exported and cached at load; "
                            "Infinity's 'optimum' means the same) or auto (onnx when onnxruntime is installed); "
                            "GPUs always run torch (default auto)")
    serve.add_argument("--dtype", choices=DTYPES,
                       help="compute precision for every model, over each model config's own (default auto: the "
                            "config's, else float32); bfloat16 runs torch, fast on CPUs with native bf16 "
                            "(AVX512-BF16, AMX); float16 is for GPUs")
    serve.add_argument("--worker-threads", type=int, help="torch threads per worker (default: all cores)")
    serve.add_argument("--onnx-lanes", type=int, metavar="N",
                       help="ONNX Runtime: forward calls run side by side, worker threads / N threads each (default: "
                            "one thread each, best under load; 1 gives a lone request every thread, best latency)")
    serve.add_argument("--max-batch-items", type=int, help="most items in one forward pass (default 64)")
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
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but health, metrics "
                                         "and docs (prefer SIE_API_KEY: command lines are visible to other users)")
    serve.add_argument("--admin-token", help="require this bearer token on the admin API, which never takes the API "
                                             "key (prefer SIE_ADMIN_TOKEN)")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug", "trace"])
    return p


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
    if given.get("engine") == "optimum":
        given["engine"] = "onnx"
    if "models" in given:
        given["models"] = tuple(given["models"])
    for name in ("preload", "pinned", "served_names", "adapters"):
        if name in given:
            given[name] = tuple(given[name])
    values.update(given)
    if given.get("hf_offline"):
        values["extra_env"] = {**values.get("extra_env", {}), "HF_HUB_OFFLINE": "1"}  # type: ignore[dict-item]
    prefix = str(values.get("url_prefix") or "")
    if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
        parser().error(f"--url-prefix must start with '/' and not end with '/', not {prefix!r}")
    if values.get("dtype", "auto") not in DTYPES:
        parser().error(f"SIE_DTYPE must be one of {', '.join(DTYPES)}, not {values['dtype']!r}")
    return Settings(**values)  # type: ignore[arg-type]


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
    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # hub downloads log their progress themselves (router/hub.py)
    registry = startup_registry(settings)
    log.info("SIE %s on http://%s:%d serving %s", __version__, settings.host, settings.port,
             ", ".join(registry.served) or "no models")
    app = build_app(settings, registry)
    _settle_heap()
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_deadline_s), http="httptools", loop="uvloop",
        access_log=False))
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


if __name__ == "__main__":
    main()
