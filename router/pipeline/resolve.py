"""Resolving the model a request names, once, into a `Resolved` (router process).

Called from route handlers only, in the request's own context, which is where the metric label is noted.
"""

from __future__ import annotations

from sie_router.errors import Api, SIEError
from sie_router.models.registry import Registry
from sie_router.pipeline.jobs import Resolved
from sie_router.request_labels import note_model
from sie_sdk.codes import ErrorCode


def resolve(registry: Registry, name: str) -> Resolved:
    """The served name as config and profile; 404 MODEL_NOT_FOUND with a close match when unknown."""
    config, profile = registry.lookup(name)
    note_model(config.sie_id)  # the request's metrics are labelled with the model it resolved to
    return Resolved(name, config, profile)


def served_model(registry: Registry, name: str, api: Api) -> Resolved:
    """The model a body's `model` field names; Infinity ignores it when one model is served, as Infinity does."""
    return resolve(registry, _match_served(registry, name, api))


def _match_served(registry: Registry, name: str, api: Api) -> str:
    served = list(registry.served)
    if api is Api.INFINITY:
        if len(registry.configs) == 1:
            return next(iter(registry.configs))
        for candidate in served:
            if name == candidate or name == "/".join(candidate.rstrip("/").split("/")[-2:]):
                return candidate
        raise SIEError(ErrorCode.INVALID_INPUT,
                       f"Invalid model: Engine for model name `{name}` not found. Available model "
                       f"names are {served}", param="model")
    if name not in registry.served:
        raise SIEError(ErrorCode.MODEL_NOT_FOUND, f"model '{name}' not found; served models: {served}", param="model")
    return name
