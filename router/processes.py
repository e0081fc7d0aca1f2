"""Starting and stopping worker processes (router process): spawn context, shared stop deadline, then SIGKILL."""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.process import BaseProcess

import msgspec

from sie_worker.loop import entry
from sie_worker.protocol import WorkerSpec

_spawn = multiprocessing.get_context("spawn")


def spawn_worker(spec: WorkerSpec) -> BaseProcess:
    """Start a worker; the spec travels as msgpack bytes, and the child sets its environment before importing torch."""
    process = _spawn.Process(target=entry, args=(msgspec.msgpack.encode(spec),), name=f"sie-worker:{spec.model}",
                             daemon=False)
    process.start()
    return process


def stop_processes(processes: list[BaseProcess], deadline_s: float) -> None:
    """SIGTERM every live process, join them all to one shared deadline, then SIGKILL the rest."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + deadline_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(5)
