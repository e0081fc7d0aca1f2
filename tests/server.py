"""Starting a real SIE server (router plus worker processes) for end-to-end tests, and stopping it cleanly."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from sie_worker.adapters import graph_cache
from tests import precision

ROOT = Path(__file__).resolve().parent.parent
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_bundle(folder: Path, *names: str) -> Path:
    """A bundle folder holding the default bundle's and the test bundle's YAML files (or just `names`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in [*(ROOT / "bundles/default").glob("*.yaml"), *(ROOT / "bundles/test").glob("*.yaml")]:
        if not names or source.name in names:
            shutil.copy(source, folder / source.name)
    return folder


def _temporary_log() -> Path:
    handle, path = tempfile.mkstemp(prefix="sie-server-", suffix=".log")
    os.close(handle)
    return Path(path)


class Server:
    """`python -m sie_router serve ...` in a subprocess; `url` once /readyz says ok."""

    def __init__(self, args: Sequence[str], env: dict[str, str | None] | None = None, log: Path | None = None,
                 port: int | None = None, command: Sequence[str] = (sys.executable, "-m", "sie_router"),
                 cwd: Path = ROOT) -> None:
        self.args = list(args)
        self.command, self.cwd = list(command), cwd  # another install (tests/test_wheel.py) runs from elsewhere
        # Offline unless the test says otherwise: the server's own default is to download. A None value unsets.
        # The precision is the suite's mode (tests/precision.py); a test's own `--dtype` flag goes over it.
        merged = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1",
                  "SIE_DTYPE": precision.server_dtype(), **(env or {})}
        self.env = {name: value for name, value in merged.items() if value is not None}
        # Without a log of its own, the server writes to a temporary one: a failed start says why, and a lost
        # port is recognisable. It is removed after a clean stop.
        self.own_log = log is None
        self.log_path = log or _temporary_log()
        self.pinned_port = port
        self._out: Any = None
        self._log_offset = 0
        self._start(port or free_port())

    def _start(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._out = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([*self.command, "serve", "--port", str(port),
                                         *self.args], env=self.env, stdout=self._out, stderr=subprocess.STDOUT,
                                        cwd=self.cwd)

    def _lost_its_port(self) -> bool:
        """Whether the server exited because another process took its port between `free_port` and the bind.

        The port is free when chosen but not held, so any client's outgoing connection (which draws from the same
        ephemeral range) can take it first; on a busy test machine that happens often enough to turn CI red."""
        return self.pinned_port is None and b"address already in use" in self.log_path.read_bytes()[self._log_offset:]

    def wait_ready(self, timeout: float = 120.0) -> Server:
        deadline = time.monotonic() + timeout
        restarts = 3
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if restarts and self._lost_its_port():
                    restarts -= 1
                    self.stop()
                    self._start(free_port())
                    continue
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30.0) -> int:
        children = self.children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        for orphan in alive:
            orphan.kill()
        if self._out is not None:
            self._out.close()
            self._out = None
        if self.own_log and self.process.returncode in (0, -signal.SIGTERM):
            self.log_path.unlink(missing_ok=True)
        if alive:
            raise AssertionError(f"orphan worker processes after shutdown: {[p.pid for p in alive]}")
        return int(self.process.returncode)


# How long a FamilyServer's first test waits for it: the graph export's own deadline, so that only an export the server
# gives up on (and serves with torch) can run past it.
READY_TIMEOUT_S = graph_cache.EXPORT_TIMEOUT_S


@dataclass
class FamilyServer:
    """A server of tiny checkpoints. It starts at once and `url` waits for it, so tests compute their references
    while the models load."""

    server: Server
    folders: dict[str, Path] = field(default_factory=dict)  # sie_id -> checkpoint folder
    ready: bool = False
    failed: BaseException | None = None  # why it never got ready: every later test fails with it at once

    @property
    def url(self) -> str:
        if self.failed is not None:
            raise RuntimeError(f"the module's server never got ready: {self.failed}")
        if not self.ready:
            try:
                # A first start exports a graph per lean model, a few at a time (export_lock.export_slots): on a
                # slow 2-core machine a dozen tiny models take minutes, and each export may take up to its deadline.
                self.server.wait_ready(timeout=READY_TIMEOUT_S)
            except BaseException as exc:
                self.failed = exc
                raise
            self.ready = True
        return self.server.url

    def engines(self) -> dict[str, str | None]:
        """sie_id -> the engine its loaded worker reports in `/v1/models` (None while not loaded)."""
        return {m["name"]: m["engine"] for m in httpx.get(f"{self.url}/v1/models").json()["models"]}


def lean_engine() -> str:
    """The engine a lean family runs on the CPU under `engine: auto`: OpenVINO where installed, else ONNX Runtime."""
    return "openvino" if importlib.util.find_spec("openvino") else "onnx"
