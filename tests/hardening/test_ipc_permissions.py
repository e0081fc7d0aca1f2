"""The worker IPC endpoints are `ipc://` sockets in a folder only the server's user can enter (0700)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import psutil

from sie_router.pool.ipc import WorkerClient
from tests.hardening.conftest import Hardened


def socket_paths(pid: int) -> list[Path]:
    return [Path(c.laddr) for c in psutil.Process(pid).net_connections(kind="unix") if c.laddr]


def test_running_server_binds_its_ipc_sockets_in_a_private_folder(hardened: Hardened) -> None:
    paths = [p for p in socket_paths(hardened.server.process.pid) if p.parent.name.startswith("sie-ipc-")]
    assert {p.name for p in paths} >= {"to-workers", "from-workers"}
    for folder in {p.parent for p in paths}:
        info = folder.stat()
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()


def test_client_folder_is_0700_and_removed_on_close() -> None:
    async def scenario() -> WorkerClient:
        client = WorkerClient(on_broken=lambda worker_id, why: None)
        try:
            assert stat.S_IMODE(client.folder.stat().st_mode) == 0o700
            assert client.to_worker_endpoint.startswith(f"ipc://{client.folder}/")
            assert client.from_worker_endpoint.startswith(f"ipc://{client.folder}/")
        finally:
            await client.close()
        return client

    assert not asyncio.run(scenario()).folder.exists()
