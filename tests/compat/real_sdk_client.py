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
def list_models(url: str, args: dict[str, Any]) -> dict[str, Any]:
    client = SIEClient(url)
    listed = {m["name"]: m for m in client.list_models()}
    return {"listed": np.array(json.dumps(listed[args["model"]])), "one": np.array(json.dumps(
        client.get_model(args["model"])))}


@scenario
def load_failed(url: str, args: dict[str, Any]) -> dict[str, Any]:
    from sie_sdk.client.errors import ModelLoadFailedError

    started = time.monotonic()
    try:
        SIEClient(url).encode(args["model"], {"text": "x"})
    except ModelLoadFailedError as exc:
        return {"error": np.array(type(exc).__name__), "seconds": np.array(time.monotonic() - started)}
    return {"error": np.array("none"), "seconds": np.array(time.monotonic() - started)}


@scenario
def refused_for_memory(url: str, args: dict[str, Any]) -> dict[str, Any]:
    """A model that does not fit the memory budget: the client waits out the first answer (MODEL_LOADING), then
    retries the refusal once (max_oom_retries=1, to keep the test short) and raises it."""
    from sie_sdk.client.errors import ResourceExhaustedError

    started = time.monotonic()
    try:
        SIEClient(url).encode(args["model"], {"text": "x"}, max_oom_retries=1)
    except ResourceExhaustedError as exc:
        return {"error": np.array(type(exc).__name__), "seconds": np.array(time.monotonic() - started)}
    return {"error": np.array("none"), "seconds": np.array(time.monotonic() - started)}


@scenario
def extract_with_labels(url: str, args: dict[str, Any]) -> dict[str, Any]:
    """NLI zero-shot (single- and multi-label) and GLiNER with labels; results as JSON; a label-less call's error."""
    client = SIEClient(url)
    items = [{"text": t} for t in args["texts"]]
    found = {
        "nli": client.extract(args["nli"], items, labels=args["labels"]),
        "nli_multi": client.extract(args["nli"], items, labels=args["labels"], options={"multi_label": True}),
        "gliner": client.extract(args["gliner"], [{"text": t, "id": f"g{i}"} for i, t in enumerate(args["texts"])],
                                 labels=args["entity_labels"], options={"threshold": 0.3}),
        "gliner_one": client.extract(args["gliner"], items[0], labels=args["entity_labels"]),
    }
    try:
        client.extract(args["gliner"], items[0])
        status, code = 200, ""
    except RequestError as exc:
        status, code = exc.status_code, str(getattr(exc, "code", ""))
    result = {name: np.array(json.dumps(value, default=str)) for name, value in found.items()}
    return {**result, "no_labels_status": np.array(status), "no_labels_code": np.array(code)}


@scenario
def encode_images(url: str, args: dict[str, Any]) -> dict[str, Any]:
    """CLIP through `Item(images=[...])`: raw PNG and WebP bytes (sent as they are), a PIL image (the SDK sends JPEG
    q95; its bytes come back for the reference), text; and corrupt bytes with a PNG signature."""
    import base64
    import io

    from PIL import Image

    from sie_sdk.images import to_jpeg_bytes

    png, webp = base64.b64decode(args["png"]), base64.b64decode(args["webp"])
    pil = Image.open(io.BytesIO(png)).convert("RGB")
    client = SIEClient(url)
    results = client.encode(args["model"], [{"images": [png]}, {"images": [pil]}, {"images": [webp]},
                                            {"text": args["text"]}])
    try:
        client.encode(args["model"], {"images": [b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4]})
        status, code = 200, ""
    except RequestError as exc:
        status, code = exc.status_code, str(getattr(exc, "code", ""))
    return {"dense": np.stack([r["dense"] for r in results]), "jpeg": np.frombuffer(to_jpeg_bytes(pil), np.uint8),
            "corrupt_status": np.array(status), "corrupt_code": np.array(code)}


OUTPUTS = ("dense", "sparse", "multivector")


@scenario
def encode_outputs(url: str, args: dict[str, Any]) -> dict[str, Any]:
    """Each of `calls` ({model, output_types, is_query}) over `texts`; arrays saved as `{call}_{output}_{item}`."""
    client = SIEClient(url)
    saved: dict[str, Any] = {}
    for n, call in enumerate(args["calls"]):
        results = client.encode(call["model"], [{"text": t} for t in args["texts"]],
                                output_types=call["output_types"], is_query=call.get("is_query"))
        for i, result in enumerate(results):
            saved[f"{n}_keys_{i}"] = np.array(json.dumps(sorted(k for k in result if k in OUTPUTS)))
            if "dense" in result:
                saved[f"{n}_dense_{i}"] = result["dense"]
            if "sparse" in result:
                saved[f"{n}_indices_{i}"] = result["sparse"]["indices"]
                saved[f"{n}_values_{i}"] = result["sparse"]["values"]
            if "multivector" in result:
                saved[f"{n}_multivector_{i}"] = result["multivector"]
    return saved


@scenario
def score_items(url: str, args: dict[str, Any]) -> dict[str, Any]:
    """`client.score` with a query id and a mix of item ids and none."""
    items = [{"text": t} if item_id is None else {"text": t, "id": item_id}
             for t, item_id in zip(args["docs"], args["ids"], strict=True)]
    result = SIEClient(url).score(args["model"], {"text": args["query"], "id": "q1"}, items)
    scores = result["scores"]
    return {"model": np.array(result["model"]), "query_id": np.array(result.get("query_id", "")),
            "item_ids": np.array([s["item_id"] for s in scores]), "ranks": np.array([s["rank"] for s in scores]),
            "scores": np.array([s["score"] for s in scores], dtype=np.float64)}


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
