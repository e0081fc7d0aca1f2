"""Encoders a user brings, through a real server: tiny sentence-transformers checkpoints of several architectures and
heads, by local path and by hub id (tests/hub.py), each answering `/v1/embeddings` as `SentenceTransformer.encode`
does, on the engine `/v1/models` reports. Most graphs are exported beforehand in this process; DeBERTa-v2's is
exported by the real helper process, and OpenVINO's refusal of it hands it to ONNX Runtime inside the worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest

from sie_sdk.wire import decode_msgpack
from sie_worker.adapters import graph_cache
from sie_worker.export_graph import export_folder
from tests import precision
from tests.adapters.test_st_encoders import E5_PROMPTS, MATRIX, TEXTS
from tests.e2e.test_hub_models import online_env
from tests.hub import LoopbackHub
from tests.server import Server
from tests.tiny_encoders import TANH, Case, build_case

pytest.importorskip("openvino")

# served name -> (case, the engine its worker reports); hub ids are served from the loopback hub.
LOCAL = {"bert-max": "openvino", "classic-labse": "openvino", "qwen3-last-prompts": "openvino",
         "t5-sentence-t5": "openvino", "deberta-v2-mean": "onnx"}
HUB = {"org/labse-bin": (Case("labse-bin", pooling="cls", dense=((24, TANH),), layout="classic", dense_bin=True),
                         "torch"),
       "org/e5": (Case("e5", prompts=E5_PROMPTS, default_prompt_name="query"), "openvino")}
EXPORTED_BY_THE_WORKER = "deberta-v2-mean"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st_encoders_e2e")
    built = {name: build_case(MATRIX[name][0], root) for name in LOCAL}
    built.update({repo: build_case(case, root) for repo, (case, _) in HUB.items()})
    return built


@pytest.fixture(scope="module")
def server(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("st_encoders_server")
    graphs = root / "xdg" / "sie" / "graphs"  # the workers' default cache under XDG_CACHE_HOME
    for name, folder in folders.items():
        if name != EXPORTED_BY_THE_WORKER:
            export_folder(folder, graphs / graph_cache.indexed_key(folder, graphs))
    args = []
    for name in LOCAL:
        args += ["-m", str(folders[name]), "--served-model-name", name]
    for repo in HUB:
        args += ["-m", repo, "--served-model-name", repo]
    with LoopbackHub({repo: folders[repo] for repo in HUB}) as hub:
        env = {**online_env(hub, root / "hf-home"), "XDG_CACHE_HOME": str(root / "xdg")}
        server = Server([*args, "--tei-model", "org/e5"], env=env, log=root / "server.log")
        try:
            yield server.wait_ready(timeout=300)
        finally:
            server.stop()


def embeddings(server: Server, model: str, texts: list[str]) -> np.ndarray:
    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": model, "input": texts}, timeout=60)
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


def assert_same(got: np.ndarray, want: np.ndarray, engine: str) -> None:
    """Within the bars of the precision the engine runs (tests/precision.py): OpenVINO the mode's, ONNX Runtime and
    torch float32; norms relatively, as these random heads are not normalised."""
    tol = precision.tolerance() if engine == "openvino" else precision.tolerance("float32")
    assert got.shape == want.shape and precision.cosines(got, want).min() >= tol.min_cosine
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=2e-2)


@pytest.mark.parametrize("name", [*LOCAL, *HUB])
def test_each_model_answers_as_sentence_transformers_on_the_engine_it_reports(
        server: Server, folders: dict[str, Path], name: str) -> None:
    from sentence_transformers import SentenceTransformer

    engine = LOCAL[name] if name in LOCAL else HUB[name][1]
    want = SentenceTransformer(str(folders[name]), device="cpu").encode(TEXTS)
    info = httpx.get(f"{server.url}/v1/models/{name}", timeout=10).json()
    assert (info["family"], info["engine"], info["dims"]["dense"]) == ("dense", engine, want.shape[1])
    assert_same(embeddings(server, name, TEXTS), want, engine)


def test_the_fallback_says_why_in_one_line(server: Server) -> None:
    lines = [line for line in server.log_tail().splitlines() if "cannot serve deberta-v2-mean" in line]
    assert lines == [lines[0]] and "If operation with dynamic rank" in lines[0]
    assert lines[0].endswith("serving it with onnxruntime")


def test_named_prompts_on_the_native_api(server: Server, folders: dict[str, Path]) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(folders["qwen3-last-prompts"]), device="cpu")
    body = {"items": [{"text": t} for t in TEXTS], "params": {"options": {"prompt_name": "query"}}}
    response = httpx.post(f"{server.url}/v1/encode/qwen3-last-prompts", content=msgspec.msgpack.encode(body),
                          headers={"content-type": "application/msgpack", "accept": "application/msgpack"},
                          timeout=60)
    assert response.status_code == 200, response.text
    got = np.stack([item["dense"]["values"] for item in decode_msgpack(response.content)["items"]])
    assert_same(got, reference.encode(TEXTS, prompt_name="query"), "openvino")
    bad = httpx.post(f"{server.url}/v1/encode/qwen3-last-prompts", timeout=30,
                     json={"items": [{"text": "x"}], "params": {"options": {"prompt_name": "nope"}}})
    assert bad.status_code == 400 and "not one of this model's prompts" in bad.text


def test_tei_routes_leave_the_default_prompt_off_as_tei_does(server: Server, folders: dict[str, Path]) -> None:
    """/v1/embeddings applies a checkpoint's default_prompt_name as sentence-transformers does (above); TEI's /embed
    applies only the prompt the request or the server names."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(folders["org/e5"]), device="cpu")
    for body, want in (({"inputs": TEXTS}, reference.encode(TEXTS, prompt="", normalize_embeddings=True)),
                       ({"inputs": TEXTS, "prompt_name": "passage"},
                        reference.encode(TEXTS, prompt_name="passage", normalize_embeddings=True))):
        response = httpx.post(f"{server.url}/embed", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert_same(np.array(response.json(), dtype=np.float32), want, "openvino")
