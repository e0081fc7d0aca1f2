"""`python -m sie_worker` (worker process): how the router starts a worker; its `WorkerSpec` arrives as msgpack on
stdin, so the router never imports the worker's modules, only its protocol."""

from __future__ import annotations

import sys

from sie_worker.loop import entry

if __name__ == "__main__":
    entry(sys.stdin.buffer.read())
