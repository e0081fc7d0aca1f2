"""Per-family adapter options (router process): a profile's options as its family's typed Struct.

The Structs are the worker's (`DenseOptions` and the rest in `sie_worker.options`): the router checks a profile's
`loadtime` and `runtime` options against its family's Struct when a bundle loads, so a misspelt key or a wrong type
fails at start, naming the file and profile, and sends the same Struct to the worker. One precedence rule holds for
every family: a request's option wins over the profile's, which wins over the server's setting of the same name
(`engine`, `onnx_lanes`, the image limits), which wins over what the checkpoint's own files say, which wins over the
adapter's default. A key may be set in `loadtime` or in `runtime`, not in both with different values: such a profile
has no one meaning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from sie_worker.options import FAMILY_OPTIONS, Common


def check_options(family: str, loadtime: Mapping[str, Any], runtime: Mapping[str, Any],
                  server: Mapping[str, Any] | None = None) -> Common:
    """The profile's options as its family's Struct (`Common` for a family without one), over the `server` settings
    of the same names; ValueError names the problem."""
    clash = sorted(k for k in set(loadtime) & set(runtime) if loadtime[k] != runtime[k])
    if clash:
        raise ValueError(f"adapter_options set {clash} in both loadtime and runtime with different values; set each "
                         "once")
    kind = FAMILY_OPTIONS.get(family, Common)
    under = {k: v for k, v in (server or {}).items() if k in kind.__struct_fields__}
    try:
        return msgspec.convert({**under, **loadtime, **runtime}, kind)
    except msgspec.ValidationError as exc:
        raise ValueError(f"adapter_options for a {family} model: {exc}") from None
