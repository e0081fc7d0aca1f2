"""Version headers (router process): an ASGI middleware that stamps every reply with the wire and engine versions."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sie_router import WIRE_VERSION, __version__


class VersionHeader:
    """Adds `X-SIE-Server-Version` (the wire version, so sie-sdk sees no skew) and our engine version to every reply."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(b"x-sie-server-version", WIRE_VERSION.encode()),
                        (b"x-sie-engine-version", __version__.encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)
