"""Start and stop the servers under test (ours, Infinity) as subprocesses on free loopback ports, bounded in time.

Each server runs in its own process group with its log in .cache/bench/logs/; stop() ends the whole group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".cache" / "bench" / "logs"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return 0


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    route: str  # the OpenAI-shaped embeddings route
    ready: str  # GET path that answers 200 once the model is loaded
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = ROOT
    proc: subprocess.Popen | None = None
    model: str = MODEL
    log_tag: str = ""  # told apart in the log's name, so that a later start keeps an earlier one's log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.route}"

    @property
    def log(self) -> Path:
        return LOGS / f"{self.name}{self.log_tag}.log"

    def launch(self) -> float:
        """Start the process without waiting; returns time.monotonic() just before it was spawned."""
        LOGS.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DO_NOT_TRACK": "1",
               **self.env}
        with self.log.open("w") as out:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                         start_new_session=True)
        return t0

    def start(self, timeout_s: float) -> tuple[bool, str]:
        """Start and wait until ready; on failure the process is stopped and the reason returned."""
        self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False, f"exited with {self.proc.returncode} at start: {self.last_log_line()}"
            if http_status(f"http://127.0.0.1:{self.port}{self.ready}") == 200:
                return True, ""
            time.sleep(0.5)
        self.stop()
        return False, f"not ready after {timeout_s:.0f} s: {self.last_log_line()}"

    def last_log_line(self) -> str:
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return (lines[-1][:200] if lines else "no output") + f" (log: {self.log})"

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass


def ours(threads: int, extra: list[str]) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "sie_router", "serve", "-m", MODEL, "--host", "127.0.0.1", "--port", str(port),
           "--worker-threads", str(threads), "--log-level", "warning", *extra]
    return Server("ours", cmd, port, "/v1/embeddings", "/readyz")


def infinity(engine: str, model_dir: Path, threads: int, cli: list[str], device: str = "cpu",
             dtype: str = "auto") -> Server:
    """Infinity runs in the model folder with `--model-id .`: optimum-onnx matches the ONNX file name Infinity passes
    (the path it globbed) against bare names, so an absolute model path makes it fail to find model.onnx."""
    port = free_port()
    cmd = [*cli, "v2", "--model-id", ".", "--served-model-name", MODEL, "--engine", engine, "--device", device,
           "--dtype", dtype, "--pooling-method", "mean", "--host", "127.0.0.1", "--port", str(port)]
    env = {"OMP_NUM_THREADS": str(threads), "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "HF_HOME": str(ROOT / ".cache" / "bench" / "hf")}
    return Server(infinity_name(engine, dtype), cmd, port, "/embeddings", "/health", env, cwd=model_dir)


def infinity_name(engine: str, dtype: str = "auto") -> str:
    return ("infinity-onnx" if engine == "optimum" else f"infinity-{engine}") + ("-bf16" if dtype == "bfloat16" else "")
