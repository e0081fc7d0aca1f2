"""Driving the Docker engine for the container tests: build the image with `scripts/image.sh`, run, inspect, exec and
stop containers. Every container is named `sie-test-*` and removed by the test that started it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
VERSION = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
               if line.startswith("version = "))
IMAGE = f"sie-server:{VERSION}"
# CI sets this (.ci/run); `make test-container` too. Without it the container tests are skipped: they need a Docker
# engine and build a 2 GB image.
ENABLED = os.environ.get("SIE_CONTAINER_TESTS") == "1"
SKIP_REASON = "container tests: set SIE_CONTAINER_TESTS=1 (CI does; `make test-container`)"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} ... exited {done.returncode}: {done.stderr.strip()}")
    return done


def build_image() -> str:
    """`scripts/image.sh` as `make image` runs it (dockerd started if needed, layer cache reused); the image's tag."""
    if shutil.which("docker") is None:
        raise AssertionError("no docker command: .ci/run installs docker.io")
    done = subprocess.run(["bash", "scripts/image.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"image build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return IMAGE


@dataclass
class Container:
    name: str

    @classmethod
    def start(cls, docker_args: list[str], image: str, args: list[str], prefix: str = "sie-test") -> Container:
        container = cls(f"{prefix}-{uuid.uuid4().hex[:8]}")
        docker("run", "-d", "--name", container.name, *docker_args, image, *args)
        return container

    def inspect(self) -> dict[str, Any]:
        return json.loads(docker("inspect", self.name).stdout)[0]

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def logs(self) -> str:
        done = docker("logs", self.name, check=False)
        return done.stdout + done.stderr

    def exec(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *cmd, timeout=timeout, check=False)

    def wait_ready(self, url: str, timeout: float = 300) -> float:
        """Seconds until `url` answers 200 (polled; the container must stay up meanwhile)."""
        started = time.monotonic()
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if not self.running():
                raise AssertionError(f"{self.name} exited before it was ready:\n{self.logs()[-4000:]}")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{self.name} not ready after {timeout:g} s:\n{self.logs()[-4000:]}")
            time.sleep(0.5)

    def wait_health(self, status: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while (found := self.inspect()["State"].get("Health", {}).get("Status")) != status:
            assert time.monotonic() < deadline, f"{self.name}: health {found!r}, not {status!r} after {timeout:g} s"
            time.sleep(0.5)

    def stop(self, grace_s: float) -> tuple[float, int]:
        """`docker stop`: the image's stop signal (SIGTERM), SIGKILL after grace_s. (seconds taken, exit code)."""
        started = time.monotonic()
        docker("stop", "-t", str(int(grace_s)), self.name, timeout=grace_s + 60)
        return time.monotonic() - started, int(self.inspect()["State"]["ExitCode"])

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)
