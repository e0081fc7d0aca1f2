"""Per-request metric labels (router process): a context variable the instrumentation middleware opens per request.

Kept free of imports so that any module resolving a model name can note it without import cycles.
"""

from __future__ import annotations

import contextvars

current: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("sie_request_labels", default=None)


def note_model(model: str) -> None:
    """Record which model the current request is for (a no-op outside a request)."""
    labels = current.get()
    if labels is not None:
        labels["model"] = model


def note_forwarded() -> None:
    """Record that the current request was relayed to another pool, which counts it as answered."""
    labels = current.get()
    if labels is not None:
        labels["forwarded"] = "yes"


def note_inputs(count: int) -> None:
    """Record how many inputs the current request carries (its trace span's `sie.inputs`)."""
    labels = current.get()
    if labels is not None:
        labels["inputs"] = str(count)
