"""The runtime model store (router process): the models added with `POST /admin/models`, kept in one JSON file
(`--model-store`) so that they are registered again at the next start.

The file is replaced atomically (a temporary file in the same folder, flushed to disk, then renamed over it), so a
crash leaves the old list or the new one, never half of either. Without a file the list lives in memory only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import msgspec

from sie_sdk.types import AddModelRequest


class StoreFile(msgspec.Struct, kw_only=True):
    """What the file holds."""

    models: list[AddModelRequest] = []


class ModelStore:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.models: dict[str, AddModelRequest] = {request.name: request for request in self._read()}

    def _read(self) -> list[AddModelRequest]:
        """The stored requests; none when the file does not exist yet. A file that cannot be read stops the start."""
        if self.path is None or not self.path.exists():
            return []
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=StoreFile).models
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"cannot read the model store {self.path}: {exc}") from None

    def put(self, request: AddModelRequest) -> None:
        self.models[request.name] = request
        self._write()

    def remove(self, name: str) -> bool:
        """Forget a stored model; whether it was stored."""
        if self.models.pop(name, None) is None:
            return False
        self._write()
        return True

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = msgspec.json.format(msgspec.json.encode(StoreFile(models=list(self.models.values()))), indent=2)
        handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data + b"\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself reaches the disk
        finally:
            os.close(folder)
