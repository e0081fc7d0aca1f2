"""Real Helm (helm-python-sdk) in a child process, for tests/deploy/test_chart.py.

Helm is a Go shared library. Loaded into the test process beside OpenVINO's thread pool (the lean dense adapters'
tests) and the end-to-end servers' child processes, it segfaulted the whole test run here; in a process of its own it
cannot. Requests and answers are JSON lines on stdin and stdout: {"op": "render"|"lint", ...} -> {"ok": result} or
{"error": message} (a HelmError).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class HelmError(Exception):
    """Helm refused the chart or its values; the message is Helm's."""


def _serve() -> None:
    import helm_python as helm

    helm.disable_logging()  # Helm logs each symlinked folder (bundle/, dashboards/) at INFO
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "render":
                with helm.Chart.load(request["chart"]) as chart:
                    answer: Any = chart.render(request["values"], name=request["name"],
                                               namespace=request["namespace"])
            else:
                answer = helm.lint(request["chart"], request["values"], strict=True,
                                   kube_version=request["kube_version"])
            reply = {"ok": answer}
        except helm.HelmError as exc:
            reply = {"error": str(exc)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class Helm:
    """One long-lived child process that answers render and lint calls in turn."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[str] | None = None

    def call(self, **request: Any) -> Any:
        if self.child is None or self.child.poll() is not None:
            self.child = subprocess.Popen([sys.executable, "-m", "tests.deploy.helm_child"], cwd=ROOT, text=True,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write(json.dumps(request) + "\n")
        self.child.stdin.flush()
        line = self.child.stdout.readline()
        if not line:
            raise RuntimeError(f"the Helm child process exited ({self.child.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise HelmError(reply["error"])
        return reply["ok"]

    def render(self, chart: Path, values: dict[str, Any], name: str, namespace: str) -> dict[str, str]:
        return dict(self.call(op="render", chart=str(chart), values=values, name=name, namespace=namespace))

    def lint(self, chart: Path, values: dict[str, Any], kube_version: str) -> dict[str, Any]:
        return dict(self.call(op="lint", chart=str(chart), values=values, kube_version=kube_version))

    def close(self) -> None:
        """End the child (it exits when its stdin closes) and close both pipes."""
        if self.child is not None:
            assert self.child.stdin is not None and self.child.stdout is not None
            self.child.stdin.close()
            self.child.wait(timeout=30)
            self.child.stdout.close()
            self.child = None


# The one child every test module shares; tests/conftest.py closes it when the session ends.
HELM = Helm()


if __name__ == "__main__":
    _serve()
