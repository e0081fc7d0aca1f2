"""What the route table says about one route (router process): its path, method and handler, and the facts auth,
forwarding, the URL prefix, error rendering and the OpenAPI document read from it (`api.routes` lists them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sie_router.errors import Api


class Access(Enum):
    """Who may call a route: anyone (probes, metrics, docs), API-key holders, or the admin token's holder."""

    OPEN = "open"
    KEY = "key"
    ADMIN = "admin"


class ModelAt(Enum):
    """Where a request names its model, so that a request for another pool's model can be forwarded unread."""

    NONE = "none"
    PATH = "path"  # the `{model}` path parameter
    BODY = "body"  # the JSON body's `model` field
    TEI = "tei"  # `/tei/{model}/{route}`, split by the TEI module's route names


@dataclass(frozen=True)
class Doc:
    """How the OpenAPI document describes a route: a summary, its tag, its request Struct and its answer's type."""

    summary: str
    tag: str
    body: type | None = None
    msgpack: bool = False
    answer: str = "application/json"
    mentions: tuple[type, ...] = ()  # bodies the summary names (TEI's), listed under components only


@dataclass(frozen=True)
class Endpoint:
    """One route of the table and everything the layers around the handlers need to know about it."""

    path: str
    method: str
    handler: Callable[[Request], Awaitable[Response]]
    doc: Doc
    api: Api = Api.NATIVE  # the envelope its errors are rendered in
    access: Access = Access.KEY
    model: ModelAt = ModelAt.NONE
    name: str | None = None  # the metric label (`endpoint`); the handler's name when None
    prefixed: bool = False  # Infinity's `--url-prefix` answers it under the prefix as well
    keeps_path: bool = False  # a prefixed route never takes this route's path over
    # For a route answering many paths: those of them that are health probes, open like the OPEN routes.
    probe: Callable[[str, str], bool] | None = None

    def route(self) -> Route:
        return Route(self.path, self.handler, methods=[self.method], name=self.name)
