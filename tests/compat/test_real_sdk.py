"""The real PyPI sie-sdk 0.10.1 client, unchanged, against our server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import precision
from tests.compat.conftest import RunScenario
from tests.sentences import SENTENCES
from tests.server import MINILM, Server

pytestmark = pytest.mark.compat


@pytest.mark.numeric
def test_encode_one_and_many_in_msgpack_and_json(server: Server, real_sdk: RunScenario,
                                                 reference_model) -> None:  # type: ignore[no-untyped-def]
    texts = SENTENCES[:6]
    got = real_sdk(server.url, "encode_dense", model=MINILM, texts=texts)
    want = reference_model.encode(texts, normalize_embeddings=True)
    assert str(got["dtype"]) == "float32" and got["one"].shape == (384,)
    precision.assert_vectors_close(got["one"], want[0])
    assert got["many"].shape == (6, 384)
    precision.assert_vectors_close(got["many"], want)
    assert list(got["ids"]) == [f"t{i}" for i in range(6)]
    np.testing.assert_array_equal(got["oracle"], got["one"])
    np.testing.assert_allclose(got["json"], got["one"], atol=1e-6)
    assert json.loads(str(got["sdk_warnings"])) == []  # no version-skew warning


def test_real_sdk_lists_models_and_passes_the_engine_through(server: Server, real_sdk: RunScenario) -> None:
    got = real_sdk(server.url, "list_models", model=MINILM)
    listed, one = json.loads(str(got["listed"])), json.loads(str(got["one"]))
    assert listed["state"] == one["state"] == "loaded" and listed["dims"] == {"dense": 384}
    assert listed["engine"] == one["engine"] != "torch"  # MiniLM on the CPU runs an exported graph


def test_unknown_model_is_request_error_404(server: Server, real_sdk: RunScenario) -> None:
    got = real_sdk(server.url, "unknown_model")
    assert int(got["status"]) == 404
    assert str(got["code"]) == "MODEL_NOT_FOUND"


def test_real_sdk_retries_through_a_cold_load(server: Server, real_sdk: RunScenario) -> None:
    from sie_worker.adapters.fake import fake_vector

    got = real_sdk(server.url, "cold_load", model="test/fake-cold-sdk")
    assert int(got["retries"]) >= 1
    np.testing.assert_allclose(got["dense"], fake_vector("wake up", 16), atol=1e-6)


def test_real_sdk_gets_a_refusal_for_a_model_that_does_not_fit_not_an_endless_load(
        tmp_path: Path, real_sdk: RunScenario) -> None:
    """The issue: each poll started a new load that placement refused again, so the client saw MODEL_LOADING and
    retried forever. Now it sees RESOURCE_EXHAUSTED, which it retries a bounded number of times, then raises."""
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "big.yaml").write_text(
        "sie_id: test/too-big\npackage_backed: true\nmemory_mb: 400\ntasks: {encode: {dense: {dim: 16}}}\n"
        "profiles: {default: {adapter: fake, max_batch_tokens: 16384, adapter_options: {loadtime: {dim: 16}}}}\n")
    srv = Server(["--bundle", str(bundle), "--memory-budget", "294M"], log=tmp_path / "log").wait_ready()
    try:
        got = real_sdk(srv.url, "refused_for_memory", model="test/too-big")
    finally:
        srv.stop()
    assert str(got["error"]) == "ResourceExhaustedError"
    assert float(got["seconds"]) < 60


def test_real_sdk_fails_fast_on_a_load_failure(server: Server, real_sdk: RunScenario) -> None:
    got = real_sdk(server.url, "load_failed", model="test/fake-missing-weights")
    assert str(got["error"]) == "ModelLoadFailedError"
    assert float(got["seconds"]) < 10
