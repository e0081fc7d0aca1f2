"""The router's two ZeroMQ sockets, shared by every worker (router process).

`send_to_workers` is a ROUTER: batches go to one worker by identity, and each worker's `Ready` or `LoadFailed`
arrives on it (the handshake on the same socket proves the route exists). `recv_from_workers` is a PULL that
gathers every worker's results. The endpoints are `ipc://` files in a private 0700 folder: only this user reaches them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import zmq
import zmq.asyncio

from sie_worker import protocol


class WorkerUnreachable(Exception):
    """The worker's socket is gone (it died or was never connected)."""


class Channel:
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="sie-ipc-"))  # mkdtemp creates it 0700
        self.context = zmq.asyncio.Context()
        self.send_to_workers = self.context.socket(zmq.ROUTER)
        self.send_to_workers.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone worker raises instead of dropping
        self.send_to_workers.setsockopt(zmq.LINGER, 0)
        self.to_worker_endpoint = f"ipc://{self.folder}/to-workers"
        self.send_to_workers.bind(self.to_worker_endpoint)
        self.recv_from_workers = self.context.socket(zmq.PULL)
        self.recv_from_workers.setsockopt(zmq.LINGER, 0)
        self.from_worker_endpoint = f"ipc://{self.folder}/from-workers"
        self.recv_from_workers.bind(self.from_worker_endpoint)

    async def send(self, worker_id: str, message: protocol.Message) -> None:
        try:
            await self.send_to_workers.send_multipart([worker_id.encode(), protocol.encode(message)], copy=False)
        except zmq.ZMQError as exc:
            raise WorkerUnreachable(f"worker {worker_id} is unreachable: {exc}") from exc

    async def recv_handshake(self) -> protocol.WorkerToRouter:
        _, frame = await self.send_to_workers.recv_multipart(copy=False)
        return protocol.decode_for_router(frame.buffer)

    async def recv_result(self) -> protocol.WorkerToRouter:
        frame = await self.recv_from_workers.recv(copy=False)
        return protocol.decode_for_router(frame.buffer)

    def close(self) -> None:
        self.send_to_workers.close(linger=0)
        self.recv_from_workers.close(linger=0)
        self.context.term()
        shutil.rmtree(self.folder, ignore_errors=True)
