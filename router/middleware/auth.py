"""Bearer-token access control (router process): an ASGI middleware in front of every route.

With an API key set, every route but the open probes and docs needs `Authorization: Bearer <key>`; the admin API
needs the admin token and never takes the API key. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from sie_router.api.endpoint import Access
from sie_router.api.routes import ADMIN_PREFIX, access_of, api_of
from sie_router.errors import Api, SIEError, render_error
from sie_router.settings import Settings
from sie_sdk.codes import ErrorCode


def bearer_token(scope: Scope) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


def _matches(token: bytes | None, secret: str | None) -> bool:
    # compare_digest takes the same time wherever the first difference is; a None token still costs a comparison.
    return secret is not None and hmac.compare_digest(token or b"", secret.encode())


class Auth:
    """Refuses requests without the right bearer token: 401 in the route's error envelope, or 403 on the admin API."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.api_key = settings.api_key or None
        self.admin_token = settings.admin_token or None

    def check(self, method: str, path: str, token: bytes | None) -> SIEError | None:
        """The error to answer with, or None when the request may go on (who may call what: the route table)."""
        access = access_of(method, path)
        if access is Access.OPEN:
            return None
        if access is Access.ADMIN:
            return self.check_admin(token)
        if self.api_key is None or _matches(token, self.api_key):
            return None
        return SIEError(ErrorCode.UNAUTHORIZED, "a valid API key is required: send 'Authorization: Bearer <key>'"
                        if token is None else "the API key is not valid")

    def check_admin(self, token: bytes | None) -> SIEError | None:
        if self.admin_token is None:
            if self.api_key is None:
                return None  # no secrets configured: the server is meant for a trusted host (it binds 127.0.0.1)
            return SIEError(ErrorCode.FORBIDDEN,
                            "the admin API is closed: the server has an API key but no admin token "
                            "(set SIE_ADMIN_TOKEN or --admin-token)")
        if _matches(token, self.admin_token):
            return None
        if token is None:
            return SIEError(ErrorCode.UNAUTHORIZED, "the admin API needs the admin token: send 'Authorization: Bearer "
                            "<admin token>'")
        if _matches(token, self.api_key):
            return SIEError(ErrorCode.FORBIDDEN, "the API key does not open the admin API; use the admin token")
        return SIEError(ErrorCode.UNAUTHORIZED, "the admin token is not valid")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.api_key is None and self.admin_token is None):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        token = bearer_token(scope)
        if path.startswith(ADMIN_PREFIX):
            # Through the Kubernetes API server's pod proxy the Authorization header is consumed by the API server,
            # so sie-admin sends the admin token in its own header there.
            token = _header(scope, b"x-sie-admin-token") or token
        error = self.check(scope["method"], path, token)
        if error is None:
            await self.app(scope, receive, send)
            return
        api = api_of(path)
        response = render_error(error, api)
        if response.status_code == 401 and api is not Api.TEI:  # TEI answers a bare 401
            response.headers.setdefault("WWW-Authenticate", "Bearer")
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key.lower() == name), None)
