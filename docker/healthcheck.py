"""The image's HEALTHCHECK: healthy once the server's models are loaded (GET /readyz answers 200).

The port is the one the server was started with: `--port` on its command line (PID 1), else SIE_PORT, else 8080,
so `docker run sie-server --port 9000` is checked on 9000 without repeating it.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def server_port() -> str:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        argv = []
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--port="):
            return arg.removeprefix("--port=")
    return os.environ.get("SIE_PORT") or "8080"


if __name__ == "__main__":
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{server_port()}/readyz", timeout=4).close()
    except OSError as exc:
        sys.exit(f"not ready: {exc}")
