"""Server settings (router process): one frozen object, built once from the CLI and `SIE_*` variables."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_BUNDLE = "default"
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Settings:
    """Everything the server reads from its environment; no other module reads `os.environ`."""

    models: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()
    bundle: str = DEFAULT_BUNDLE
    bundle_dirs: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "auto"
    worker_threads: int = 0
    # Dense encoders' engine on CPU (torch, onnx or auto); a model config's own `engine` loadtime option wins.
    # auto: ONNX Runtime on CPU (faster than torch at every load shape of make bench), torch on GPUs and whenever
    # the export fails.
    engine: str = "auto"
    # ONNX Runtime forward calls run side by side, one thread each (0: as many as worker threads). 1 gives a lone
    # request every thread: lower latency at concurrency 1, less throughput under load (bench/README.md, "lanes").
    onnx_lanes: int = 0
    # Compute precision for every model, over the model configs' own `compute_precision` (auto: theirs, else float32).
    # bfloat16 runs torch (ONNX Runtime is float32 only); on a CPU with native bf16 (AVX512-BF16, AMX) it beats the
    # float32 ONNX engine on big requests and trails it on many small ones, at sentence cosine >= 0.9998 for
    # all-MiniLM-L6-v2 (bench/README.md). float16 is for GPUs; CPU workers run it as float32.
    dtype: str = "auto"
    # Batching (per model): a forward pass holds at most this many items, waits at most this long to fill.
    max_batch_items: int = 64
    max_wait_ms: float = 2.0
    # Items queued per model; 2048 so that one OpenAI request of 2048 inputs (its documented maximum) fits.
    max_queue_items: int = 2048
    max_total_queue_items: int = 4096  # across every model, so many busy models cannot grow memory without bound
    # Limits on a request.
    max_request_bytes: int = 34 * 1024 * 1024
    max_item_bytes: int = 2 * 1024 * 1024
    max_items_per_request: int = 2048
    # Images: the router refuses an image over max_image_bytes; workers that decode images refuse more pixels.
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # How long OpenAI and Infinity routes hold a request while its model loads.
    load_wait_s: float = 120.0
    # A request still unanswered after this long gets 504 DEADLINE_EXCEEDED (0: no deadline); under the SDK's
    # 150 s read timeout, so clients get a coded answer rather than a timeout of their own.
    request_timeout_s: float = 140.0
    load_timeout_s: float = 600.0
    shutdown_deadline_s: float = 20.0
    # Memory: the CPU budget in bytes (0: 80% of host RAM), the share of each GPU's memory workers may use.
    memory_budget: int = 0
    gpu_memory_fraction: float = 0.9
    pinned: tuple[str, ...] = ()
    idle_ttl_s: float = 0.0
    # Crash budget: this many unexpected worker exits within the window make the model fail until the cooldown.
    crash_budget: int = 3
    crash_window_s: float = 600.0
    api_key: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    token_ids: str = "cl100k_base"
    log_level: str = "info"
    # Offline: models come only from folders, the cache and packages (HF_HUB_OFFLINE=1 or --offline); else the hub too.
    hf_offline: bool = False
    # Per -m model, in order: the name it answers under on every API, and the adapter family that overrides inference.
    served_names: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    # Infinity's --url-prefix: its compatibility routes are also served under this prefix (e.g. /v1).
    url_prefix: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    # Pools (Helm chart): this server's pool name, and the pool map (model -> pool Service URL) for forwarding.
    pool: str | None = None
    pool_map: Path | None = None

    @property
    def serves_bundle(self) -> bool:
        """With no `-m`, the whole bundle is served lazily."""
        return not self.models


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_bytes(text: str) -> int:
    """`"2GiB"`, `"512MB"`, `"1000000"` -> bytes."""
    number = text.strip().rstrip("BbIiKkMmGg") or "0"
    unit = text.strip()[len(number):].lower()
    if unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 2GiB or 512MB")
    return int(float(number) * _UNITS[unit])


def env_defaults(environ: dict[str, str] | None = None) -> dict[str, object]:
    """Settings overrides from `SIE_*` variables (the CLI parser uses them as defaults)."""
    env = os.environ if environ is None else environ
    found: dict[str, object] = {}
    simple: dict[str, tuple[str, Callable[[str], object]]] = {
        "SIE_HOST": ("host", str), "SIE_PORT": ("port", int), "SIE_DEVICE": ("device", str),
        "SIE_ENGINE": ("engine", str), "SIE_BUNDLE": ("bundle", str), "SIE_WORKER_THREADS": ("worker_threads", int),
        "SIE_ONNX_LANES": ("onnx_lanes", int), "SIE_DTYPE": ("dtype", str),
        "SIE_MAX_BATCH_ITEMS": ("max_batch_items", int), "SIE_MAX_WAIT_MS": ("max_wait_ms", float),
        "SIE_MAX_CONCURRENT_REQUESTS": ("max_queue_items", int),
        "SIE_MAX_TOTAL_QUEUED": ("max_total_queue_items", int),
        "SIE_MAX_REQUEST_BODY_BYTES": ("max_request_bytes", int),
        "SIE_MAX_ITEM_TEXT_BYTES": ("max_item_bytes", int), "SIE_LOAD_WAIT_S": ("load_wait_s", float),
        "SIE_REQUEST_TIMEOUT_S": ("request_timeout_s", float),
        "SIE_MAX_ITEMS_PER_REQUEST": ("max_items_per_request", int),
        "SIE_MAX_IMAGE_BYTES": ("max_image_bytes", parse_bytes), "SIE_MAX_IMAGE_PIXELS": ("max_image_pixels", int),
        "SIE_API_KEY": ("api_key", str), "SIE_ADMIN_TOKEN": ("admin_token", str),
        "SIE_LOG_LEVEL": ("log_level", str), "SIE_TOKEN_IDS": ("token_ids", str),
        "SIE_MEMORY_BUDGET": ("memory_budget", parse_bytes), "SIE_GPU_MEMORY_FRACTION": ("gpu_memory_fraction", float),
        "SIE_IDLE_TTL_S": ("idle_ttl_s", float), "SIE_SHUTDOWN_DEADLINE_S": ("shutdown_deadline_s", float),
    }
    for name, (attr, kind) in simple.items():
        if env.get(name):
            found[attr] = kind(env[name])
    if env.get("SIE_PINNED"):
        found["pinned"] = tuple(m for m in env["SIE_PINNED"].split(";") if m)
    if env.get("SIE_MODELS"):
        found["models"] = tuple(m for m in env["SIE_MODELS"].split(";") if m)
    if env.get("SIE_POOL"):
        found["pool"] = env["SIE_POOL"]
    if env.get("SIE_POOL_MAP"):
        found["pool_map"] = Path(env["SIE_POOL_MAP"])
    if env.get("SIE_BUNDLE_DIRS"):
        found["bundle_dirs"] = tuple(Path(p) for p in env["SIE_BUNDLE_DIRS"].split(os.pathsep) if p)
    found["hf_offline"] = env.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")  # as huggingface_hub
    if env.get("SIE_URL_PREFIX"):
        found["url_prefix"] = env["SIE_URL_PREFIX"]
    # Workers inherit the process environment; these are the ones we pass on explicitly.
    extra_env = {k: env[k] for k in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE") if k in env}
    # Image adapters enforce the pixel bound (and the byte bound again) while decoding; they read these, as numbers.
    for name, attr in (("SIE_MAX_IMAGE_PIXELS", "max_image_pixels"), ("SIE_MAX_IMAGE_BYTES", "max_image_bytes")):
        if attr in found:
            extra_env[name] = str(found[attr])
    found["extra_env"] = extra_env
    return found
