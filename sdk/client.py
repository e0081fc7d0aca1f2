"""SIEClient: the sync client of the native API (msgpack over httpx), with retries by error code."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx
import msgspec

from sie_sdk.codes import ClientCode
from sie_sdk.errors import RETRYABLE_CODES, SIEError, error_from_response
from sie_sdk.types import EncodeParams, EncodeRequest, ExtractParams, ExtractRequest, Item, ScoreRequest
from sie_sdk.wire import decode_msgpack, encode_msgpack

_MSGPACK = "application/msgpack"
_DEFAULT_RETRY_AFTER_S = 1.0


def _as_item(item: Item | dict[str, Any]) -> Item:
    return item if isinstance(item, Item) else msgspec.convert(item, Item)


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return None if parsed is None else max(0.0, parsed.timestamp() - time.time())
    return seconds if seconds >= 0 else None


def _error_fields(response: httpx.Response) -> tuple[str | None, str, str | None, dict[str, Any]]:
    try:
        body = response.json()
    except ValueError:
        return response.headers.get("x-sie-error-code"), response.text, None, {}
    detail = body.get("detail", body.get("error", body)) if isinstance(body, dict) else body
    if not isinstance(detail, dict):
        return response.headers.get("x-sie-error-code"), str(detail), None, {}
    code = response.headers.get("x-sie-error-code") or detail.get("code")
    return code, str(detail.get("message", detail)), detail.get("param"), detail


class SIEClient:
    """Client of one SIE server. `encode`, `score` and `extract` take one item (one result) or a list (a list)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", *, api_key: str | None = None,
                 timeout_s: float = 150.0, retry_budget_s: float = 900.0) -> None:
        headers = {"Content-Type": _MSGPACK, "Accept": _MSGPACK}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s,
                                  follow_redirects=False)
        self._retry_budget_s = retry_budget_s
        self.last_retry_count = 0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SIEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(self, model: str, items: Item | dict[str, Any] | list[Item | dict[str, Any]], *,
               output_types: list[str] | None = None, instruction: str | None = None,
               output_dtype: str | None = None, is_query: bool | None = None,
               options: dict[str, Any] | None = None) -> Any:
        """Encode items; each result holds the requested outputs (`dense` is a numpy array)."""
        single = not isinstance(items, list)
        opts = dict(options or {})
        if is_query is not None:
            opts["is_query"] = is_query
        params = EncodeParams(output_types=output_types, instruction=instruction, output_dtype=output_dtype,
                              options=opts or None)
        request = EncodeRequest(items=[_as_item(i) for i in ([items] if single else items)], params=params)
        body = self._post(f"/v1/encode/{model}", request)
        results = [self._encode_result(raw, body["model"]) for raw in body["items"]]
        if len(results) != len(request.items):
            raise SIEError("server returned a different number of results",
                           code=ClientCode.ENCODE_RESULT_COUNT_MISMATCH)
        return results[0] if single else results

    def score(self, model: str, query: Item | dict[str, Any], items: list[Item | dict[str, Any]], *,
              instruction: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rank items against the query; `scores` is sorted best first, each with `item_id`, `score`, `rank`."""
        request = ScoreRequest(query=_as_item(query), items=[_as_item(i) for i in items], instruction=instruction,
                               options=options)
        return dict(self._post(f"/v1/score/{model}", request))

    def extract(self, model: str, items: Item | dict[str, Any] | list[Item | dict[str, Any]], *,
                labels: list[str] | None = None, instruction: str | None = None,
                options: dict[str, Any] | None = None) -> Any:
        """Extract entities, classifications and more from each item."""
        single = not isinstance(items, list)
        request = ExtractRequest(items=[_as_item(i) for i in ([items] if single else items)],
                                 params=ExtractParams(labels=labels, instruction=instruction, options=options))
        results = self._post(f"/v1/extract/{model}", request)["items"]
        return results[0] if single else results

    def list_models(self) -> list[dict[str, Any]]:
        response = self._http.get("/v1/models", headers={"Accept": "application/json"})
        if response.status_code >= 400:
            raise self._final_error(response)
        return list(response.json()["models"])

    @staticmethod
    def _encode_result(raw: dict[str, Any], model: str) -> dict[str, Any]:
        result: dict[str, Any] = {"model": model}
        if "id" in raw:
            result["id"] = raw["id"]
        if "dense" in raw:
            result["dense"] = raw["dense"]["values"]
        if "sparse" in raw:
            result["sparse"] = {"indices": raw["sparse"]["indices"], "values": raw["sparse"]["values"]}
        if "multivector" in raw:
            result["multivector"] = raw["multivector"]["values"]
        return result

    def _post(self, path: str, request: msgspec.Struct) -> Any:
        payload = encode_msgpack(request)
        deadline = time.monotonic() + self._retry_budget_s
        self.last_retry_count = 0
        while True:
            response = self._http.post(path, content=payload)
            if response.status_code < 400:
                return decode_msgpack(response.content)
            code, _, _, _ = _error_fields(response)
            wait = _retry_after_seconds(response.headers.get("retry-after"))
            retryable = response.status_code == 429 or (response.status_code == 503 and code in RETRYABLE_CODES)
            if not retryable or time.monotonic() + (wait or 0) > deadline:
                raise self._final_error(response)
            self.last_retry_count += 1
            time.sleep(_DEFAULT_RETRY_AFTER_S if wait is None else wait)

    @staticmethod
    def _final_error(response: httpx.Response) -> SIEError:
        code, message, param, details = _error_fields(response)
        return error_from_response(response.status_code, code, message, param, details)
