"""Server settings (router process): one frozen msgspec Struct, built once from the CLI and the environment.

Convention: a field `foo_bar` is read from `SIE_FOO_BAR` and from the flag `--foo-bar` (added in `__main__.py`);
`msgspec.convert` turns the strings into the field's type (a tuple field splits on `;`, `bundle_dirs` on the path
separator; `SIZE_FIELDS` also take `2GiB`). Adding a setting is one line here, plus its flag. Flags win over the
environment; `ENV_ALIASES` keeps the older variable names working. A field with a closed set of values is a `Literal`
(its flag's choices come from it), `VALUE_ALIASES` maps other servers' names for a value onto ours, and
`build_settings` refuses a bad value with one sentence naming the variable or flag and what it takes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import msgspec

from sie_worker.options import DEFAULT_ENGINE, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, RUNTIME_LANES, Engine

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_BUNDLE = "default"

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
LogFormat = Literal["text", "json"]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the server reads from its environment; no other module reads `os.environ`."""

    models: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()
    bundle: str = DEFAULT_BUNDLE
    bundle_dirs: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    device: Device = "auto"
    worker_threads: int = 0
    # The CPU engine of the lean families (dense, sparse, ColBERT, BGE-M3, rerankers, classifiers: adapters.LEAN),
    # torch, onnx, openvino or auto; a model config's own `engine` option wins. auto: a worker without torch serving the
    # exported graph under OpenVINO (bf16 where the CPU has it natively and the head's probe bar holds), else ONNX
    # Runtime; torch on GPUs and whenever the export or its check fails (worker/adapters/lean_engine.py).
    engine: Engine = DEFAULT_ENGINE
    # Forward calls side by side (0: the runtime's default: ONNX Runtime one call per worker thread, OpenVINO one
    # stream on every thread). ORT with 1 gives a lone request every thread: lower latency at concurrency 1, less
    # throughput under load (bench/README.md, "lanes").
    onnx_lanes: int = RUNTIME_LANES
    # Compute precision for every model, over the model configs' own `compute_precision` (auto: theirs, else on a GPU
    # float16, bfloat16 where fp16 overflows (DeBERTa-v2/v3, GLiNER) or the checkpoint was saved in it, with TF32 for
    # the float32 matmuls left (worker/cuda.py); else float32). On the CPU, dense encoders under OpenVINO already run
    # bfloat16 where the CPU has it natively, checked against float32 at load; float32 here forces float32 there.
    # bfloat16 runs the other families' torch in bf16. float16 is for GPUs; CPU workers run it as float32.
    dtype: Dtype = "auto"
    # Batching (per model): a batch holds at most this many items (0: 64 on the CPU; on GPUs, the model's token budget
    # over 16, so the token budget sizes it), and waits at most this long to fill.
    max_batch_items: int = 0
    max_wait_ms: float = 2.0
    # Items queued per model; 2048 so that one OpenAI request of 2048 inputs (its documented maximum) fits.
    max_queue_items: int = 2048
    max_total_queue_items: int = 4096  # across every model, so many busy models cannot grow memory without bound
    # Limits on a request.
    max_request_bytes: int = 34 * 1024 * 1024
    max_item_bytes: int = 2 * 1024 * 1024
    max_items_per_request: int = 2048
    # Images: the router refuses an image over max_image_bytes; workers that decode images refuse more pixels (and
    # bytes again); a model config's own `max_image_*` options win.
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    # How long OpenAI and Infinity routes hold a request while its model loads.
    load_wait_s: float = 120.0
    # A request still unanswered after this long gets 504 DEADLINE_EXCEEDED (0: no deadline); under the SDK's
    # 150 s read timeout, so clients get a coded answer rather than a timeout of their own.
    request_timeout_s: float = 140.0
    load_timeout_s: float = 600.0
    # A transient load failure (EMFILE, a crash while loading) is answered 502 for this long, then retried; each
    # failure in a row doubles the wait (up to 16 times this).
    load_retry_cooldown_s: float = 30.0
    # A load refused for memory (503 RESOURCE_EXHAUSTED) is every request's answer, with no new load, until memory is
    # freed (a worker stopped or evicted, a reservation settled lower) or this long has passed.
    load_refusal_hold_s: float = 5.0
    # A worker is hung, killed and restarted when a batch makes no progress for 20 times its expected busy time, at
    # least batch_timeout_floor_s and at most batch_timeout_s (batch_timeout_s while its pace is still unknown; never
    # under 3 times the expected time, so a low bound cannot kill healthy workers of a slow model).
    batch_timeout_s: float = 30.0
    batch_timeout_floor_s: float = 10.0
    shutdown_deadline_s: float = 20.0
    # Memory: the CPU budget in bytes (0: 80% of host RAM), the share of each GPU's memory workers may use.
    memory_budget: int = 0
    gpu_memory_fraction: float = 0.9
    # The server's own CUDA_VISIBLE_DEVICES (None: unset; empty: no GPU): workers are placed on those GPUs only.
    cuda_visible_devices: str | None = None
    pinned: tuple[str, ...] = ()
    idle_ttl_s: float = 0.0
    # A ready worker that dies or hangs is replaced after a back-off: restart_backoff_s, doubling with each crash in a
    # row up to restart_backoff_max_s; a worker that served restart_backoff_reset_s before it crashed starts again
    # from restart_backoff_s. Requests during a back-off get 503 MODEL_LOADING with Retry-After the time left. The cap
    # bounds an outage: a fault, the cap and a torch worker's load (~12 s on a busy 2-core node) fit in 30 s; a model
    # that crashes on every batch costs one load every 10 s. Half a minute of serving is a healthy run: when a node's
    # bad day kills a worker every minute or so, a longer reset would never forget (bench/chaos.py).
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 10.0
    restart_backoff_reset_s: float = 30.0
    # Liveness: a ready worker is pinged every ping_interval_s (0: never); one that does not answer within
    # ping_timeout_s is frozen, killed and replaced like a hung one.
    ping_interval_s: float = 1.0
    ping_timeout_s: float = 5.0
    api_key: str | None = None  # secret: kept out of repr
    admin_token: str | None = None  # secret: kept out of repr
    log_level: LogLevel = "info"
    # Logs: text lines, or one JSON object a line (`--json-output`, TEI's flag) in the router and every worker;
    # uvicorn's access log (one line a request, with its request id) is off unless asked for.
    log_format: LogFormat = "text"
    access_log: bool = False
    # Tracing, OpenTelemetry over OTLP/HTTP (protobuf): off unless an endpoint is set, here (`--otlp-endpoint`, the
    # collector's base URL; /v1/traces is appended) or by the standard OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT variables.
    otlp_endpoint: str | None = None
    otlp_service_name: str = "sie"
    otlp_protocol: str = "http/protobuf"  # from OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL; only this one is spoken
    # CORS: the origins browsers may call from (`--cors-allow-origin`, TEI), or any (`--permissive-cors`, Infinity);
    # closed when neither is set.
    cors_allow_origins: tuple[str, ...] = ()
    permissive_cors: bool = False
    # Models added at runtime (`POST /admin/models`) are kept in this JSON file and registered again at start; without
    # it they are lost at restart.
    model_store: Path | None = None
    # Offline: models come only from folders, the cache and packages (HF_HUB_OFFLINE=1 or --offline); else the hub too.
    hf_offline: bool = False
    # Run the custom code a checkpoint's config names (`auto_map`), on torch; off, such a model is refused.
    trust_remote_code: bool = False
    # Per -m model, in order: the name it answers under on every API, and the adapter family that overrides inference.
    served_names: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    # Infinity's --url-prefix: its compatibility routes are also served under this prefix (e.g. /v1).
    url_prefix: str = ""
    extra_env: dict[str, str] = {}
    # TEI routes: the models answering at the root (one per model type; default: the first served model of each
    # type), and the defaults of TEI's flags of the same names.
    tei_models: tuple[str, ...] = ()
    auto_truncate: bool = True
    max_client_batch_size: int = 32
    default_prompt_name: str | None = None
    default_prompt: str | None = None
    # Pools (Helm chart): this server's pool name, and the pool map (model -> pool Service URL) for forwarding.
    pool: str | None = None
    pool_map: Path | None = None

    @property
    def serves_bundle(self) -> bool:
        """With no `-m`, the whole bundle is served lazily."""
        return not self.models

    def __repr__(self) -> str:
        shown = {f: getattr(self, f) for f in self.__struct_fields__ if f not in SECRETS}
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


# The values of each closed field, from its Literal.
CHOICES: dict[str, tuple[str, ...]] = {name: get_args(kind) for name, kind in get_type_hints(Settings).items()
                                       if get_origin(kind) is Literal}
# Other servers' names for a value, accepted from flags and variables alike: Infinity's `optimum` engine is ONNX
# Runtime.
VALUE_ALIASES: dict[str, dict[str, str]] = {"engine": {"optimum": "onnx"}}
SECRETS = frozenset({"api_key", "admin_token"})
# Older variable names, still read when the field's own `SIE_<FIELD>` is unset.
ENV_ALIASES = {
    "max_queue_items": "SIE_MAX_CONCURRENT_REQUESTS",
    "max_total_queue_items": "SIE_MAX_TOTAL_QUEUED",
    "max_request_bytes": "SIE_MAX_REQUEST_BODY_BYTES",
    "max_item_bytes": "SIE_MAX_ITEM_TEXT_BYTES",
}
SIZE_FIELDS = frozenset({"memory_budget", "max_image_bytes"})
# Set from other sources than `SIE_<FIELD>` (below), never from their own variable.
DERIVED = frozenset({"extra_env", "hf_offline", "cuda_visible_devices", "otlp_protocol"})

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_bytes(text: str) -> int:
    """`"2GiB"`, `"512MB"`, `"1000000"` -> bytes."""
    number = text.strip().rstrip("BbIiKkMmGg") or "0"
    unit = text.strip()[len(number):].lower()
    if unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 2GiB or 512MB")
    return int(float(number) * _UNITS[unit])


def _from_text(field: msgspec.structs.FieldInfo, text: str) -> Any:
    if field.name in SIZE_FIELDS:
        return parse_bytes(text)
    if field.name == "bundle_dirs":
        return [p for p in text.split(os.pathsep) if p]
    if isinstance(field.default, tuple):
        return [v for v in text.split(";") if v]
    return text


def env_defaults(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Raw settings from `SIE_<FIELD>` variables (and their aliases); the CLI's values go over them."""
    env = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    for field in msgspec.structs.fields(Settings):
        if field.name in DERIVED:
            continue
        text = env.get(f"SIE_{field.name.upper()}") or env.get(ENV_ALIASES.get(field.name, ""))
        if text:
            found[field.name] = _from_text(field, text)
    found["hf_offline"] = env.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")  # as huggingface_hub
    found["cuda_visible_devices"] = env.get("CUDA_VISIBLE_DEVICES")  # set but empty hides every GPU
    found.update(_otel_env(env))
    # Workers inherit the process environment; these are the ones we pass on explicitly.
    found["extra_env"] = {k: env[k] for k in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE") if k in env}
    return found


TRACES_PATH = "/v1/traces"


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (OTEL_EXPORTER_OTLP_ENDPOINT's meaning, and TEI's flag's)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


def _otel_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Tracing from OpenTelemetry's standard variables, when the `SIE_OTLP_*` ones do not say: an endpoint turns it
    on (`OTEL_TRACES_EXPORTER=otlp` alone means the local collector), `OTEL_TRACES_EXPORTER=none` or
    `OTEL_SDK_DISABLED=true` keep it off."""
    found: dict[str, Any] = {}
    if env.get("OTEL_SERVICE_NAME") and not env.get("SIE_OTLP_SERVICE_NAME"):
        found["otlp_service_name"] = env["OTEL_SERVICE_NAME"]
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol:
        found["otlp_protocol"] = protocol
    exporters = {e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if env.get("SIE_OTLP_ENDPOINT") or "none" in exporters or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return found
    url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
        traces_url(env["OTEL_EXPORTER_OTLP_ENDPOINT"]) if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") else None)
    if url is None and "otlp" in exporters:
        url = traces_url("http://localhost:4318")
    if url:
        found["otlp_endpoint"] = url
    return found


def _check_origin(origin: str, where: str) -> None:
    """A CORS origin is `*` or scheme://host[:port], exactly as a browser sends it in `Origin`."""
    parts = urlsplit(origin)
    if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query
                          or parts.fragment or origin.endswith("/")):
        raise ValueError(f"{where}: {origin!r} is not an origin; give scheme://host[:port] with no path, e.g. "
                         "https://app.example.com, or * for any")


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Path:
        return Path(value)
    raise NotImplementedError(f"no conversion to {kind}")


def choices(field: str) -> tuple[str, ...]:
    """What a closed field accepts: its values, then the aliases of values (for a flag's `choices`)."""
    return (*CHOICES[field], *VALUE_ALIASES.get(field, {}))


def _source(field: str, sources: Mapping[str, str]) -> str:
    return sources.get(field, f"SIE_{field.upper()}")


def _checked(values: dict[str, Any], sources: Mapping[str, str]) -> dict[str, Any]:
    """Aliases mapped, closed fields and the checks that span fields done; ValueError says what and where."""
    values = dict(values)
    for field, aliases in VALUE_ALIASES.items():
        if values.get(field) in aliases:
            values[field] = aliases[values[field]]
    for field, allowed in CHOICES.items():
        if field in values and values[field] not in allowed:
            also = "".join(f" (or {alias}, for {value})" for alias, value in VALUE_ALIASES.get(field, {}).items())
            raise ValueError(f"{_source(field, sources)} must be one of {', '.join(allowed)}{also}, not "
                             f"{values[field]!r}")
    prefix = str(values.get("url_prefix") or "")
    if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
        raise ValueError(f"{_source('url_prefix', sources)} must start with '/' and not end with '/', not {prefix!r}")
    endpoint = values.get("otlp_endpoint")
    if endpoint:
        if not str(endpoint).startswith(("http://", "https://")):
            raise ValueError(f"{_source('otlp_endpoint', sources)} must be an http:// or https:// URL (the "
                             f"collector's OTLP/HTTP endpoint), not {endpoint!r}")
        values["otlp_endpoint"] = traces_url(str(endpoint))
        if values.get("otlp_protocol", "http/protobuf") != "http/protobuf":
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL is {values['otlp_protocol']!r}, but SIE exports traces "
                             "over OTLP/HTTP with protobuf only: unset it and point the endpoint at the collector's "
                             "HTTP port (4318 by default)")
    for origin in values.get("cors_allow_origins") or ():
        _check_origin(str(origin), _source("cors_allow_origins", sources))
    if values.get("default_prompt") and values.get("default_prompt_name"):
        raise ValueError("--default-prompt and --default-prompt-name (SIE_DEFAULT_PROMPT, SIE_DEFAULT_PROMPT_NAME) "
                         "cannot both be set")
    return values


def build_settings(values: dict[str, Any], sources: Mapping[str, str] | None = None) -> Settings:
    """Settings from raw values (strings from the environment, typed values from flags). A bad value is a ValueError
    naming where it came from: `sources` maps a field to its flag, when a flag gave it; else it is `SIE_<FIELD>`."""
    sources = sources or {}
    values = _checked(values, sources)
    try:
        return msgspec.convert(values, Settings, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        field = str(exc).rpartition("`$.")[2].rstrip("`").split(".")[0].split("[")[0]
        where = _source(field, sources) if field in Settings.__struct_fields__ else "a setting"
        raise ValueError(f"invalid setting {where}: {exc}") from None
