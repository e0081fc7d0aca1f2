"""Results reach their own request and position: 64 concurrent clients, 2,048 requests of distinct texts."""

from __future__ import annotations

import asyncio
import random

import httpx
import numpy as np

from sie_worker.adapters.fake import fake_vector
from tests.hardening.conftest import Hardened

FAKE = "test/fake-dense"
CLIENTS = 64
REQUESTS_PER_CLIENT = 32


async def one_request(client: httpx.AsyncClient, texts: list[str], route: str) -> list[np.ndarray]:
    """Send the texts through one of the three APIs; return the vectors in the order the response gives them."""
    if route == "native":
        response = await client.post(f"/v1/encode/{FAKE}", json={"items": [{"id": t, "text": t} for t in texts]})
        response.raise_for_status()
        items = response.json()["items"]
        assert [item["id"] for item in items] == texts
        return [np.array(item["dense"]["values"], dtype=np.float32) for item in items]
    response = await client.post("/v1/embeddings" if route == "openai" else "/embeddings",
                                 json={"model": FAKE, "input": texts})
    response.raise_for_status()
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(len(texts)))
    return [np.array(d["embedding"], dtype=np.float32) for d in data]


async def one_client(hardened: Hardened, number: int, seen: list[str]) -> int:
    rng = random.Random(number)
    mismatches = 0
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(base_url=hardened.url, headers={**hardened.auth, "accept": "application/json"},
                                 timeout=60, limits=limits) as client:
        for n in range(REQUESTS_PER_CLIENT):
            # Distinct texts of varied lengths, so the batcher groups and reorders them by length.
            texts = [f"client {number} request {n} item {i} " + "pad " * rng.randrange(40)
                     for i in range(rng.choice((1, 1, 2, 5)))]
            route = rng.choice(("native", "native", "openai", "infinity"))
            vectors = await one_request(client, texts, route)
            assert len(vectors) == len(texts)
            for text, vector in zip(texts, vectors, strict=True):
                expected = fake_vector(text.strip() if route == "infinity" else text, 16)
                mismatches += not np.allclose(vector, expected, atol=1e-6)
                seen.append(text)
    return mismatches


async def test_every_result_reaches_its_own_request(hardened: Hardened) -> None:
    seen: list[str] = []
    mismatches = await asyncio.gather(*(one_client(hardened, c, seen) for c in range(CLIENTS)))
    assert sum(mismatches) == 0
    assert CLIENTS * REQUESTS_PER_CLIENT >= 2000
    assert len(seen) == len(set(seen)) >= CLIENTS * REQUESTS_PER_CLIENT  # nothing missing or duplicated
