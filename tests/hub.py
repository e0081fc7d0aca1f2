"""A Hugging Face Hub on loopback for tests: the file protocol the real `huggingface_hub` client downloads with.

Serves folders as repos (`{"org/name": Path}`) at one fixed commit each: the model-info API
(`/api/models/{repo}[/revision/{rev}]`, with `sha` and `siblings`), the tree API (`/api/models/{repo}/tree/{rev}`)
and file downloads (`HEAD`/`GET /{repo}/resolve/{rev}/{path}` with `ETag`, `X-Repo-Commit` and `Content-Length`).
Anything else is 404 with the `X-Error-Code` the client reads. Every request is recorded, so tests can check what was
asked for.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def _files(folder: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path.relative_to(folder).as_posix(), path


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class LoopbackHub:
    """`with LoopbackHub(repos) as hub:` serves on `hub.url` until the block ends."""

    def __init__(self, repos: dict[str, Path], file_delay_s: float = 0.0) -> None:
        self.repos = repos
        self.outage: int | None = None  # set to a status (503) and every request gets it, as an overloaded hub
        self.file_delay_s = file_delay_s  # a slow link: each file body waits this long
        self.commits = {repo: _sha(repo.encode()) for repo in repos}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def log_message(self, format: str, *args: object) -> None:  # quiet: tests read `hub.requests`
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="loopback-hub", daemon=True)

    def __enter__(self) -> LoopbackHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _repo_and_rest(self, path: str) -> tuple[str | None, str]:
        """The longest served repo id that `path` starts with, and what follows it."""
        for repo in sorted(self.repos, key=len, reverse=True):
            if path == repo or path.startswith(repo + "/"):
                return repo, path[len(repo):].lstrip("/")
        return None, path

    def _answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(request.path).path).lstrip("/")
        self.requests.append((request.command, path))
        if self.outage is not None:
            return self._send(request, self.outage, b"Service unavailable", body, {})
        api = path.startswith("api/models/")
        repo, rest = self._repo_and_rest(path.removeprefix("api/models/") if api else path)
        if repo is None:
            return self._send(request, 404, b'{"error": "Repository not found"}', body,
                              {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"})
        if api and (rest == "" or rest.startswith("revision/")):
            return self._json(request, self._info(repo), body)
        if api and rest.startswith("tree/"):
            return self._json(request, self._tree(repo), body)
        if not api and rest.startswith("resolve/"):
            file = rest.split("/", 2)[2] if rest.count("/") >= 2 else ""
            target = self.repos[repo] / file
            if file and target.is_file():
                data = target.read_bytes()
                if body and self.file_delay_s:
                    time.sleep(self.file_delay_s)
                return self._send(request, 200, data, body, {
                    "ETag": f'"{_sha(data)}"', "X-Repo-Commit": self.commits[repo],
                    "Content-Type": "application/octet-stream"})
            return self._send(request, 404, b"Entry not found", body, {
                "X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commits[repo]})
        return self._send(request, 404, b"Not found", body, {})

    def _info(self, repo: str) -> dict[str, object]:
        return {"id": repo, "modelId": repo, "sha": self.commits[repo], "private": False,
                "siblings": [{"rfilename": name} for name, _ in _files(self.repos[repo])]}

    def _tree(self, repo: str) -> list[dict[str, object]]:
        return [{"type": "file", "path": name, "size": path.stat().st_size, "oid": _sha(path.read_bytes())}
                for name, path in _files(self.repos[repo])]

    def _json(self, request: BaseHTTPRequestHandler, data: object, body: bool) -> None:
        self._send(request, 200, json.dumps(data).encode(), body, {"Content-Type": "application/json"})

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, data: bytes, body: bool, headers: dict[str, str]) -> None:
        request.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            request.send_header(name, value)
        request.end_headers()
        if body:
            request.wfile.write(data)
