"""Hypothesis sends hostile and malformed requests to every route of the server's own `/openapi.json`.

None may get a 5xx other than a retryable 503 with Retry-After, or a 502 `MODEL_LOAD_FAILED` for the models built to
fail; no worker dies; a normal request succeeds afterwards. The budget is bounded (about 600 requests).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sie_sdk.types import OUTPUT_DTYPES
from sie_worker.adapters.fake import fake_vector
from tests.hardening.conftest import Hardened
from tests.server import MINILM

EXAMPLES = 600
FAKE = "test/fake-dense"
FAILING = ("test/fake-broken", "test/fake-missing-weights")  # 502 MODEL_LOAD_FAILED is their right answer
MODELS = [FAKE, FAKE, MINILM, MINILM, *FAILING, "no/such-model", "../../../../etc/passwd", "/etc/passwd",
          "file:///etc/passwd", "http://169.254.169.254/latest/meta-data", "~/.ssh/id_rsa", f"{FAKE}:nope",
          f"{FAKE}:default", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "a" * 3000, "モデル", " ",
          "test/fake-dense/../fake-broken"]
RETRYABLE = {"MODEL_LOADING", "QUEUE_FULL", "RESOURCE_EXHAUSTED"}
HOSTILE = ["", " ", "\x00", "\u202e", "😀" * 60, "a" * 20_000, "{instruction}", "{text}", "<script>x</script>",
           "' OR 1=1 --", "${jndi:ldap://x}", "../../etc/passwd", "\r\nX-Injected: 1", "NaN", "-1", "1e309"]

scalars = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.sampled_from([2**63, -(2**63) - 1, 10**40, -1, 0]) | st.text(max_size=20) | st.sampled_from(HOSTILE))
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
texts = st.text(max_size=40) | st.sampled_from(HOSTILE)


def either(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right shape, sometimes any JSON value at all."""
    return st.one_of(good, good, good, anything)


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(required, optional=optional or {})


option_names = st.sampled_from(["profile", "instruction", "is_query", "truncate", "output_types", "output_dtype",
                                "pooling", "normalize", "query_template", "doc_template", "default_instruction",
                                "raw_scores", "max_length", "labels", "threshold"]) | st.text(max_size=8)
options = st.dictionaries(option_names, anything, max_size=4)
images = st.lists(obj({"data": either(st.sampled_from(["aGVsbG8=", "", "!!notbase64", "iVBORw0KGgo="]))},
                      {"format": texts}), max_size=2)
item = obj({}, {"id": either(texts), "text": either(texts), "images": either(images), "metadata": anything,
                "audio": anything})
items = st.lists(either(item), max_size=5)
models = st.sampled_from(MODELS)
likely = st.sampled_from([FAKE, MINILM]) | st.sampled_from([FAKE, MINILM]) | models  # mostly served models
inputs = (texts | st.lists(texts, max_size=5) | st.lists(st.integers(-5, 2**40), max_size=6)
          | st.lists(st.lists(st.integers(-5, 200_000), max_size=4), max_size=3))

BODIES: dict[str, st.SearchStrategy[Any]] = {
    "AddModelRequest": obj({"model": either(models)}, {
        "adapter": either(texts), "served_model_name": either(texts), "loadtime": either(options),
        "runtime": either(options), "max_batch_tokens": anything, "compute_precision": anything, "load": anything}),
    "EncodeRequest": obj({"items": either(items)}, {"params": either(obj({}, {
        "output_types": either(st.lists(st.sampled_from(["dense", "sparse", "multivector", "x"]), max_size=3)),
        "output_dtype": either(st.sampled_from([*OUTPUT_DTYPES, "float64"])), "instruction": either(texts),
        "options": either(options)}))}),
    "ScoreRequest": obj({"query": either(item), "items": either(items)},
                        {"instruction": either(texts), "options": either(options)}),
    "ExtractRequest": obj({"items": either(items)}, {"params": either(obj({}, {
        "labels": either(st.lists(texts, max_size=4)), "options": either(options), "output_schema": anything,
        "instruction": either(texts)}))}),
    "EmbeddingsRequest": obj({"input": either(inputs)}, {
        "model": either(models), "encoding_format": either(st.sampled_from(["float", "base64", "x"])),
        "dimensions": either(st.integers(-3, 40)), "modality": either(st.sampled_from(["text", "image", "x"])),
        "user": anything, "is_query": anything, "instruction": either(texts)}),
    "RerankRequest": obj({"query": either(texts), "documents": either(st.lists(texts | obj({"text": either(texts)}),
                                                                               max_size=5))},
                         {"model": either(models), "top_n": either(st.integers(-2, 10)),
                          "return_documents": anything, "raw_scores": anything, "options": either(options)}),
    "ClassifyRequest": obj({"input": either(inputs)}, {"model": either(models), "raw_scores": anything}),
}


# Well-formed bodies with hostile values, so requests get past decoding into the batcher, the worker and back.
plain_items = st.lists(obj({"text": texts}, {"id": st.text(max_size=5)}), min_size=1, max_size=4)
VALID: dict[str, st.SearchStrategy[Any]] = {
    "EncodeRequest": obj({"items": plain_items}, {"params": obj({}, {
        "output_types": st.sampled_from([["dense"], ["dense"], ["sparse"], ["dense", "multivector"]]),
        "output_dtype": st.sampled_from(OUTPUT_DTYPES), "instruction": texts,
        "options": st.dictionaries(st.sampled_from(["truncate", "is_query", "normalize", "pooling"]),
                                   st.booleans() | st.sampled_from(["mean", "cls", "last", "none", "weird"]),
                                   max_size=2)})}),
    "ScoreRequest": obj({"query": obj({"text": texts}), "items": plain_items}),
    "ExtractRequest": obj({"items": plain_items, "params": obj({"labels": st.lists(texts, min_size=1, max_size=3)})}),
    "EmbeddingsRequest": obj({"input": texts | st.lists(texts, min_size=1, max_size=4), "model": likely},
                             {"dimensions": st.integers(0, 400),
                              "encoding_format": st.sampled_from(["float", "base64"])}),
    "RerankRequest": obj({"query": texts, "documents": st.lists(texts, min_size=1, max_size=4), "model": likely},
                         {"top_n": st.integers(1, 5), "return_documents": st.booleans()}),
    "ClassifyRequest": obj({"input": st.lists(texts, min_size=1, max_size=3), "model": likely}),
    "AddModelRequest": obj({"model": models}, {"adapter": st.sampled_from(["dense", "sparse", "bogus"]),
                                               "load": st.booleans(), "runtime": options}),
}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    body: str | None  # the request Struct's schema name


def operations(document: dict[str, Any]) -> list[Operation]:
    found = []
    for path, methods in document["paths"].items():
        for method, spec in methods.items():
            ref = spec.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            found.append(Operation(method.upper(), path, ref.get("$ref", "").rsplit("/", 1)[-1] or None))
    return found


def encoded(value: Any, how: str) -> bytes:
    if how == "msgpack":
        try:
            return msgspec.msgpack.encode(value)
        except OverflowError:  # an int past 64 bits has no msgpack form; send it as JSON
            pass
    text = json.dumps(value).encode()  # NaN and Infinity come out as invalid JSON, on purpose
    return text[: len(text) // 2] if how == "truncated" else text


@dataclass(frozen=True)
class Sent:
    op: Operation
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    model: str | None


@st.composite
def well_formed(draw: st.DrawFn, op: Operation, hardened: Hardened) -> Sent:
    """The right method, key and content type, a well-formed body with hostile values, a served model or not."""
    model = draw(likely)
    msgpack = "{model}" in op.path and draw(st.booleans())
    body = encoded(draw(VALID[op.body]), "msgpack" if msgpack else "json") if op.body else b""
    headers = {**hardened.auth, "content-type": "application/msgpack" if msgpack else "application/json",
               "accept": draw(st.sampled_from(["application/json", "application/msgpack"]))}
    return Sent(op, op.method, op.path.replace("{model}", quote(model, safe="/:")), headers, body,
                model if "{model}" in op.path else None)


@st.composite
def malformed(draw: st.DrawFn, op: Operation, hardened: Hardened) -> Sent:
    """Anything goes: methods, paths, keys, content types, encodings and bodies."""
    model = draw(models | st.text(min_size=1, max_size=30))
    path = op.path.replace("{model}", quote(model, safe="/:"))
    method = op.method if draw(st.integers(0, 9)) else draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    if not draw(st.integers(0, 19)):
        path = draw(st.sampled_from(["/v2/encode/x", "/v1/encode", "/v1/encode/", "/admin", "//v1/models", "/.env"]))
    how = draw(st.sampled_from(["json", "json", "json", "msgpack", "truncated", "raw"]))
    if how == "raw":
        body = draw(st.binary(max_size=300) | st.sampled_from([b"", b"[" * 3000, b'{"items": ' + b"[" * 3000]))
    else:
        shape = draw(st.sampled_from([VALID, BODIES, BODIES, None])) if op.body else None
        body = encoded(draw(shape[op.body] if shape and op.body else anything), how)
    keys = [hardened.auth] * 8 + [{}, {"authorization": "Bearer x"}]
    # The admin token may list workers and models but not evict or remove them: that stops a worker, which is no
    # crash, and a removed model would turn the rest of the fuzz into 404s.
    stops = op.path.endswith("/evict") or (op.method == "DELETE" and op.path.startswith("/admin/models"))
    auth = draw(st.sampled_from(keys if stops else [*keys, hardened.admin]))
    content_type = draw(st.sampled_from(["application/json", "application/msgpack", "application/x-msgpack",
                                         "text/plain", "multipart/form-data; boundary=x", ""]))
    accept = draw(st.sampled_from(["application/json", "application/msgpack", "*/*", "text/html", ""]))
    headers = {**auth, "content-type": content_type, "accept": accept}
    return Sent(op, method, path, {k: v for k, v in headers.items() if v}, body,
                model if "{model}" in op.path else None)


@st.composite
def requests(draw: st.DrawFn, ops: list[Operation], hardened: Hardened) -> Sent:
    op = draw(st.sampled_from(ops))
    kind = well_formed if op.body and draw(st.integers(0, 9)) < 4 else malformed
    return draw(kind(op, hardened))


def check(response: httpx.Response, model: str | None, body: bytes) -> None:
    status, code = response.status_code, response.headers.get("x-sie-error-code")
    context = f"{response.request.method} {response.request.url.path} {body[:200]!r} -> {status} {response.text[:300]}"
    if status >= 400:
        assert code, f"an error that did not go through the error table: {context}"
    if status < 500:
        return
    # What reached the server names the model: httpx removes a path's dot segments (RFC 3986), so a drawn
    # "test/fake-dense/../fake-broken" is sent as, and answered for, test/fake-broken.
    named = f"{response.request.url.path} {model or ''} {body.decode('utf-8', 'replace')}"
    if status == 503 and code in RETRYABLE and "retry-after" in response.headers:
        return
    assert status == 502 and code == "MODEL_LOAD_FAILED" and any(m in named for m in FAILING), context


def test_hostile_requests_never_get_a_5xx_and_never_kill_a_worker(hardened: Hardened) -> None:
    document = httpx.get(f"{hardened.url}/openapi.json").json()
    ops = operations(document)
    assert len(ops) >= 19
    workers_before = {p.pid for p in hardened.server.children()}
    statuses: Counter[int] = Counter()
    sent: Counter[Operation] = Counter()
    answered: Counter[str] = Counter()  # well-formed requests that went through a model

    with httpx.Client(base_url=hardened.url, timeout=30) as client:

        def send(request: Sent) -> None:
            response = client.request(request.method, request.path, headers=request.headers,
                                      content=request.body if request.method != "GET" else None)
            statuses[response.status_code] += 1
            sent[request.op] += 1
            if response.status_code == 200 and request.op.body:
                answered[request.op.path] += 1
            check(response, request.model, request.body)

        def fuzz(over: list[Operation], examples: int) -> None:
            run = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                           suppress_health_check=[HealthCheck.too_slow])(given(request=requests(over, hardened))(send))
            run()

        fuzz(ops, EXAMPLES)
        # A random draw over ~27 routes can miss one: each route it missed gets a few requests of its own.
        for op in [op for op in ops if not sent[op]]:
            fuzz([op], 5)

    assert sum(statuses.values()) >= 500, statuses
    assert statuses[200] > 0 and statuses[400] > 0 and statuses[401] > 0, statuses
    assert set(sent) == set(ops), f"routes never fuzzed: {set(ops) - set(sent)}"
    assert sum(answered.values()) >= 10, answered  # the fuzz reaches the models, not just the decoder
    assert "unhandled error" not in hardened.log.read_text()
    alive = {p.pid for p in hardened.server.children() if p.is_running()}
    assert workers_before <= alive, f"workers died: {workers_before - alive}"
    after = httpx.post(f"{hardened.url}/v1/encode/{FAKE}", json={"items": [{"text": "still fine"}]},
                       headers={**hardened.auth, "accept": "application/json"})
    assert after.status_code == 200
    assert np.allclose(after.json()["items"][0]["dense"]["values"], fake_vector("still fine", 16), atol=1e-6)
    real = httpx.post(f"{hardened.url}/v1/embeddings", json={"model": MINILM, "input": "still fine"},
                      headers=hardened.auth)
    assert real.status_code == 200 and len(real.json()["data"][0]["embedding"]) == 384
