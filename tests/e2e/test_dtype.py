"""`--dtype bfloat16`: every model runs in bf16 (a dense encoder on the CPU under OpenVINO's bf16, the others in
torch's), within bf16's bars against the float32 reference (tests/precision.py). Only on a CPU with native bf16."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from tests import precision
from tests.sentences import SENTENCES
from tests.server import MINILM, Server, make_bundle


@pytest.mark.skipif(not precision.has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")
def test_bfloat16_for_every_model_stays_within_cosine_of_float32(tmp_path: Path, reference_model) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "server.log"
    server = Server(["--bundle", str(make_bundle(tmp_path / "bundle", "all-minilm-l6-v2.yaml")), "-m", MINILM,
                     "--dtype", "bfloat16"], log=log).wait_ready()
    try:
        body = httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, "input": SENTENCES}, timeout=60).json()
        got = np.asarray([row["embedding"] for row in sorted(body["data"], key=lambda row: row["index"])])
    finally:
        assert server.stop() in (0, -15)
    want = np.asarray(reference_model.encode(SENTENCES, normalize_embeddings=True))
    precision.assert_vectors_close(got, want, precision.tolerance("bfloat16"))
    assert np.abs(got - want).max() > 1e-4  # float32 agrees to about 1e-6: these really came from bf16
    assert "engine: openvino (bf16" in log.read_text()
