"""Runs inside .venv-compat (Python 3.12, PyPI sie-sdk 0.10.1 only): drives our server with the real client.

Usage: python real_sdk_client.py URL SCENARIO OUT.npz. Each scenario saves arrays and facts for the pytest side
(tests/compat/test_real_sdk.py) to compare against references computed in the project venv.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
from sie_sdk import SIEClient
from sie_sdk._msgpack import packb, unpackb
from sie_sdk.client.errors import RequestError

SCENARIOS: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {}


def scenario(fn: Callable[[str, dict[str, Any]], dict[str, Any]]) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
def encode_dense(url: str, args: dict[str, Any]) -> dict[str, Any]:
    client = SIEClient(url)
    one = client.encode(args["model"], {"text": args["texts"][0]})
    many = client.encode(args["model"], [{"text": t, "id": f"t{i}"} for i, t in enumerate(args["texts"])])
    raw = httpx.post(f"{url}/v1/encode/{args['model']}", content=packb({"items": [{"text": args["texts"][0]}]}),
                     headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"})
    oracle = unpackb(raw.content, numeric_arrays=True)["items"][0]["dense"]["values"]
    as_json = httpx.post(f"{url}/v1/encode/{args['model']}", json={"items": [{"text": args["texts"][0]}]},
                         headers={"Accept": "application/json"}).json()
    return {"one": one["dense"], "many": np.stack([r["dense"] for r in many]),
            "ids": np.array([r.get("id", "") for r in many]), "oracle": oracle,
            "json": np.array(as_json["items"][0]["dense"]["values"], dtype=np.float32),
            "dtype": np.array(str(one["dense"].dtype))}


@scenario
def unknown_model(url: str, args: dict[str, Any]) -> dict[str, Any]:
    try:
        SIEClient(url).encode("no/such-model", {"text": "x"})
    except RequestError as exc:
        return {"status": np.array(exc.status_code), "code": np.array(str(getattr(exc, "code", "")))}
    return {"status": np.array(200)}


@scenario
def cold_load(url: str, args: dict[str, Any]) -> dict[str, Any]:
    client = SIEClient(url)
    result = client.encode(args["model"], {"text": "wake up"})
    return {"dense": result["dense"], "retries": np.array(client.last_retry_count)}


@scenario
def load_failed(url: str, args: dict[str, Any]) -> dict[str, Any]:
    from sie_sdk.client.errors import ModelLoadFailedError

    started = time.monotonic()
    try:
        SIEClient(url).encode(args["model"], {"text": "x"})
    except ModelLoadFailedError as exc:
        return {"error": np.array(type(exc).__name__), "seconds": np.array(time.monotonic() - started)}
    return {"error": np.array("none"), "seconds": np.array(time.monotonic() - started)}


def main() -> None:
    url, name, out = sys.argv[1], sys.argv[2], sys.argv[3]
    args = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    warnings: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger().addHandler(Capture())
    result = SCENARIOS[name](url, args)
    result["sdk_warnings"] = np.array(json.dumps(warnings))
    np.savez(out, **result)


if __name__ == "__main__":
    main()
