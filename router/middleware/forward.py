"""Pool forwarding (router process): a request for a model that another pool serves goes, in one hop, to that pool's
Service, named by the pool map the Helm chart mounts (`SIE_POOL_MAP`, JSON: model -> pool Service URL)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sie_router import request_labels
from sie_router.api import tei
from sie_router.api.endpoint import Endpoint, ModelAt
from sie_router.api.routes import ENDPOINTS, ROUTES, api_of
from sie_router.errors import SIEError, render_error
from sie_router.models.registry import Registry
from sie_router.settings import Settings
from sie_sdk.codes import ErrorCode

log = logging.getLogger("sie.forward")

# Set on every forwarded request; a request that carries it is always answered locally, so a stale or wrong map
# costs at most one hop and never loops.
FORWARDED_BY = b"x-sie-forwarded-by"
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"trailers", b"transfer-encoding", b"upgrade"})
# httpx sets host; the version headers are added again by VersionHeader, outside this middleware.
_REQUEST_DROP = HOP_BY_HOP | {b"host", FORWARDED_BY}
_RESPONSE_DROP = HOP_BY_HOP | {b"x-sie-server-version", b"x-sie-engine-version"}
# Generous: the other pool may hold the request while its model loads (load_wait_s, 120 s by default).
TIMEOUT = httpx.Timeout(connect=10.0, read=150.0, write=60.0, pool=30.0)
LIMITS = httpx.Limits(max_connections=512, max_keepalive_connections=64)


class _Model(msgspec.Struct):
    model: str | None = None


class _Disconnected(Exception):
    """The client went away while its request body was being relayed."""


def load_pool_map(path: Path) -> dict[str, str]:
    """The chart's `pools.json`: `{"<model>": "http://<pool service>:<port>", ...}`."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the pool map {path}: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(model, str) and isinstance(url, str)
                                            and url.startswith(("http://", "https://")) for model, url in raw.items()):
        raise ValueError(f"pool map {path}: expected a JSON object of model -> pool Service URL (http://...)")
    return {model: url.rstrip("/") for model, url in raw.items()}


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key.lower() == name), None)


def _body_model(body: bytes) -> str | None:
    """The JSON body's `model` field, or None when the body is malformed (the local handler then says why)."""
    try:
        return msgspec.json.decode(body, type=_Model).model
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that hands out the messages already read, then reads on."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body", False):
            return


class Forward:
    """Forwards requests for another pool's models to that pool and relays its answer; a no-op without a pool map."""

    def __init__(self, app: ASGIApp, settings: Settings, registry: Registry, pool_map: dict[str, str]) -> None:
        self.app = app
        self.pool = (settings.pool or "unnamed").encode()
        self.pool_map = pool_map  # `load_pool_map(settings.pool_map)`, read once by the app
        self.registry = registry
        self.limit = settings.max_request_bytes
        self.client: httpx.AsyncClient | None = None

    def target(self, model: str) -> tuple[str, str] | None:
        """(the map's name for the model, its pool's URL) when another pool serves it, else None."""
        base = model.split(":", 1)[0]  # `<model>:<profile>`
        if model in self.registry.served or base in self.registry.configs:
            return None
        for name in (model, base):
            if name in self.pool_map:
                return name, self.pool_map[name]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            try:
                await self.app(scope, receive, send)
            finally:
                if self.client is not None:
                    await self.client.aclose()
            return
        if scope["type"] != "http" or not self.pool_map or _header(scope, FORWARDED_BY) is not None:
            await self.app(scope, receive, send)
            return
        model, receive = await self._model(scope, receive)
        found = self.target(model) if model else None
        if found is None:
            await self.app(scope, receive, send)
            return
        await self._forward(scope, receive, send, *found)

    async def _model(self, scope: Scope, receive: Receive) -> tuple[str | None, Receive]:
        """The model the request names, where its route in the table says it names one; the route is the one
        Starlette would take (its path and method), or the path's alone, whatever the method, as Starlette's 405."""
        matched = _matched(scope)
        if matched is None:
            return None, receive
        endpoint, match, params = matched
        if endpoint.model is ModelAt.PATH:
            return params["model"], receive
        if endpoint.model is ModelAt.BODY and match is Match.FULL:
            return await self._peek_model(scope, receive)
        if endpoint.model is ModelAt.TEI and params["route"].startswith(tei.PER_MODEL_PREFIX[1:]):
            rest = params["route"][len(tei.PER_MODEL_PREFIX) - 1:]
            found = tei.split_path(rest, lambda name: name in self.registry.served or self.target(name) is not None)
            return (found[0] if found else None), receive
        return None, receive

    async def _peek_model(self, scope: Scope, receive: Receive) -> tuple[str | None, Receive]:
        """The body's model, read without consuming the body: the returned `receive` replays it."""
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            return None, receive  # the handler refuses it (413) without reading it
        messages: list[Message] = []
        size, more = 0, True
        while more and size <= self.limit:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return None, _replay(messages, receive)
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        if more:
            return None, _replay(messages, receive)
        return _body_model(b"".join(m.get("body", b"") for m in messages)), _replay(messages, receive)

    def _http_client(self) -> httpx.AsyncClient:
        if self.client is None:
            # trust_env off: traffic between pools stays inside the cluster, never through an HTTP(S)_PROXY.
            self.client = httpx.AsyncClient(timeout=TIMEOUT, limits=LIMITS, trust_env=False)
        return self.client

    def _note(self, scope: Scope, model: str) -> None:
        """Label the request for the Instrument middleware: forwarded, its model, the route it would have had here."""
        request_labels.note_model(model)
        request_labels.note_forwarded()
        for route in ROUTES:
            match, child = route.matches(scope)
            if match is Match.FULL:
                scope["endpoint"] = child["endpoint"]
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send, model: str, url: str) -> None:
        self._note(scope, model)
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        target = url + raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        named = {token.strip().lower().encode() for token in (_header(scope, b"connection") or b"").decode(
            "latin-1").split(",") if token.strip()}
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _REQUEST_DROP and k.lower() not in named]
        headers.append((FORWARDED_BY, self.pool))
        content = None if scope["method"] in ("GET", "HEAD") else _body_chunks(receive)
        client = self._http_client()
        request = client.build_request(scope["method"], target, headers=headers, content=content)
        log.debug("forwarding %s %s for %s to %s", scope["method"], scope["path"], model, url)
        try:
            response = await client.send(request, stream=True)
        except _Disconnected:
            return
        except httpx.HTTPError as exc:
            if isinstance(exc.__cause__ or exc.__context__, _Disconnected):
                return
            log.warning("the pool at %s, which serves %s, is not answering: %r", url, model, exc)
            error = SIEError(ErrorCode.POOL_UNAVAILABLE, f"the pool serving '{model}' is not answering yet (it may be "
                             f"starting); retry shortly")
            await render_error(error, api_of(scope["path"]))(scope, receive, send)
            return
        try:
            relayed = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in _RESPONSE_DROP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": relayed})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:
            log.warning("the pool at %s broke off its answer for %s: %r", url, model, exc)
            raise
        finally:
            await response.aclose()


def _matched(scope: Scope) -> tuple[Endpoint, Match, dict[str, str]] | None:
    """The table's route for this request, its match and its path parameters: the first full match, else the first
    route whose path matches (a wrong method)."""
    partial = None
    for endpoint, route in zip(ENDPOINTS, ROUTES, strict=True):
        match, child = route.matches(scope)
        if match is Match.FULL:
            return endpoint, match, child["path_params"]
        if match is Match.PARTIAL and partial is None:
            partial = endpoint, match, child["path_params"]
    return partial
