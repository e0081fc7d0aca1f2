"""Any model a user names: `-m org/<model>` downloaded from a Hub on loopback, its family inferred from its files.

One server serves tiny checkpoints of every family, each named only by its hub id, with `HF_HUB_OFFLINE` unset and an
empty cache: the real `huggingface_hub` client downloads them from tests/hub.py. Each family's answers are compared with
the references the family tests use. A second server takes the same folders by local path and must answer the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from sie_sdk.wire import decode_msgpack
from tests import precision, references
from tests import tiny_extract_models as tiny_extract
from tests import tiny_models as tiny
from tests.e2e.test_extract_families import assert_classifications, extract
from tests.e2e.test_retrieval_families import ALL, QUERIES, TEXTS, check_multivector, post, sparse_row
from tests.extract_server import ENTITY_LABELS, LABELS, clip_image, clip_reference, clip_text, image_bytes
from tests.extract_server import TEXTS as EXTRACT_TEXTS
from tests.hub import LoopbackHub
from tests.retrieval_server import BGE_M3_COLBERT_DIM, vocab_size
from tests.server import FamilyServer, Server, make_bundle

ATOL = precision.TORCH_FLOAT32_ATOL  # not `numeric`: float32 mode only, where lean and torch families agree to this
DOCS = ["paris is the capital and largest city of france", "berlin is in germany", *TEXTS[1:6]]


def _gliner(folder: Path) -> Path:
    return tiny_extract.build_gliner(folder, tiny_extract.build_bert(folder.parent / "gliner-backbone"))


# hub repo -> (checkpoint builder, the family its files must be inferred as)
REPOS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "org/dense": (tiny.build_dense_st, "dense"),
    "org/splade": (tiny.build_sparse_st, "sparse"),
    "org/mlm": (tiny.build_mlm, "sparse"),
    "org/colbert": (tiny.build_colbert_stanford, "multivector"),
    "org/colbert-pylate": (tiny.build_colbert_pylate, "multivector"),
    "org/bge-m3": (lambda f: tiny.build_bge_m3(f, colbert_dim=BGE_M3_COLBERT_DIM), "hybrid"),
    "org/reranker": (tiny.build_cross_encoder, "cross_encoder"),
    "org/nli": (tiny_extract.build_nli, "classifier"),
    "org/sentiment": (tiny_extract.build_sentiment, "classifier"),
    "org/ner": (tiny_extract.build_ner, "ner"),
    "org/gliner": (_gliner, "gliner"),
    "org/clip": (tiny_extract.build_clip, "clip"),
}
# By local path too: the layouts that were once served as dense (or refused images).
LOCAL = ("org/colbert", "org/colbert-pylate", "org/bge-m3", "org/splade", "org/gliner", "org/clip")
UNSERVED = "org/on-the-hub-but-not-served"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub_models")
    built = {repo: build(root / repo.split("/")[1]) for repo, (build, _) in REPOS.items()}
    built[UNSERVED] = built["org/dense"]
    return built


@pytest.fixture(scope="module")
def hub(folders: dict[str, Path]) -> Iterator[LoopbackHub]:
    with LoopbackHub(folders) as running:
        yield running


def online_env(hub: LoopbackHub, home: Path) -> dict[str, str | None]:
    """The hub on loopback, an empty cache, and no offline switch."""
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_CACHE": None, "HF_HUB_OFFLINE": None,
            "TRANSFORMERS_OFFLINE": None, "HF_TOKEN": None}


@pytest.fixture(scope="module")
def hub_server(hub: LoopbackHub, folders: dict[str, Path],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[FamilyServer]:
    root = tmp_path_factory.mktemp("hub_server")
    args = [arg for repo in REPOS for arg in ("-m", repo)]
    server = Server(args, env=online_env(hub, root / "hf-home"), log=root / "server.log")
    try:
        yield FamilyServer(server=server, folders={repo: folders[repo] for repo in REPOS})
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local_server(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[FamilyServer]:
    root = tmp_path_factory.mktemp("local_server")
    server = Server([arg for repo in LOCAL for arg in ("-m", str(folders[repo]))], log=root / "server.log")
    try:
        yield FamilyServer(server=server, folders={str(folders[repo]): folders[repo] for repo in LOCAL})
    finally:
        server.stop()


# -- each family against its reference ---------------------------------------------------------------------------------


def encode(srv: FamilyServer, model: str, texts: list[str], **params: Any) -> list[dict[str, Any]]:
    response = post(srv, f"/v1/encode/{model}", {"items": [{"text": t} for t in texts], "params": params})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = decode_msgpack(response.content)["items"]
    return items


def check_dense(srv: FamilyServer, model: str, folder: Path) -> None:
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    got = np.stack([item["dense"]["values"] for item in encode(srv, model, TEXTS)])
    precision.assert_vectors_close(got, want)


def check_sparse(srv: FamilyServer, model: str, folder: Path) -> None:
    items = encode(srv, model, TEXTS, output_types=["sparse"])
    got = np.stack([sparse_row(item["sparse"], vocab_size(folder)) for item in items])
    np.testing.assert_allclose(got, references.splade(folder, TEXTS), atol=ATOL)


def check_colbert(layout: str) -> Callable[[FamilyServer, str, Path], None]:
    def check(srv: FamilyServer, model: str, folder: Path) -> None:
        for texts, is_query in ((QUERIES, True), (DOCS, False)):
            items = encode(srv, model, texts, output_types=["multivector"], options={"is_query": is_query})
            for item, rows in zip(items, references.colbert(layout, folder, texts, is_query), strict=True):
                check_multivector(item["multivector"], rows, tiny.COLBERT_DIM)

    return check


def check_bge_m3(srv: FamilyServer, model: str, folder: Path) -> None:
    dense, lexical, rows = references.bge_m3(folder, TEXTS)
    items = encode(srv, model, TEXTS, output_types=ALL)
    np.testing.assert_allclose(np.stack([item["dense"]["values"] for item in items]), dense, atol=ATOL)
    got = np.stack([sparse_row(item["sparse"], vocab_size(folder)) for item in items])
    np.testing.assert_allclose(got, references.lexical_rows(lexical, vocab_size(folder)), atol=ATOL)
    for item, want in zip(items, rows, strict=True):
        check_multivector(item["multivector"], want, BGE_M3_COLBERT_DIM)


def check_reranker(srv: FamilyServer, model: str, folder: Path) -> None:
    from sentence_transformers import CrossEncoder

    want = CrossEncoder(str(folder), device="cpu").predict([(QUERIES[0], d) for d in DOCS])
    response = post(srv, f"/v1/score/{model}", {"query": {"text": QUERIES[0]},
                                                "items": [{"text": d, "id": str(i)} for i, d in enumerate(DOCS)]})
    assert response.status_code == 200, response.text
    by_id = {s["item_id"]: s["score"] for s in msgspec.msgpack.decode(response.content)["scores"]}
    np.testing.assert_allclose([by_id[str(i)] for i in range(len(DOCS))], want, atol=ATOL)


def check_nli(srv: FamilyServer, model: str, folder: Path) -> None:
    from transformers import pipeline

    reference = pipeline("zero-shot-classification", model=str(folder), device="cpu")
    body = extract(srv, model, [{"text": t} for t in EXTRACT_TEXTS], LABELS)
    for result, want in zip(body["items"], reference(EXTRACT_TEXTS, candidate_labels=LABELS), strict=True):
        assert_classifications(result["classifications"], list(zip(want["labels"], want["scores"], strict=True)))


def check_sentiment(srv: FamilyServer, model: str, folder: Path) -> None:
    from transformers import pipeline

    reference = pipeline("text-classification", model=str(folder), top_k=None, device="cpu")
    body = extract(srv, model, [{"text": t} for t in EXTRACT_TEXTS])
    for result, found in zip(body["items"], reference(EXTRACT_TEXTS), strict=True):
        assert_classifications(result["classifications"], [(d["label"], d["score"]) for d in found])


def check_ner(srv: FamilyServer, model: str, folder: Path) -> None:
    from transformers import pipeline

    reference = pipeline("token-classification", model=str(folder), aggregation_strategy="simple", device="cpu")
    body = extract(srv, model, [{"text": t} for t in EXTRACT_TEXTS])
    for result, want in zip(body["items"], reference(EXTRACT_TEXTS), strict=True):
        assert [(e["label"], e["start"], e["end"]) for e in result["entities"]] == [
            (w["entity_group"], w["start"], w["end"]) for w in want]


def check_gliner(srv: FamilyServer, model: str, folder: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from gliner import GLiNER

    reference = GLiNER.from_pretrained(str(folder), local_files_only=True)
    body = extract(srv, model, [{"text": t} for t in EXTRACT_TEXTS], ENTITY_LABELS, threshold=0.5)
    found = 0
    for text, result in zip(EXTRACT_TEXTS, body["items"], strict=True):
        want = reference.predict_entities(text, ENTITY_LABELS, threshold=0.5)
        assert [(e["text"], e["label"]) for e in result["entities"]] == [(w["text"], w["label"]) for w in want]
        assert [e["score"] for e in result["entities"]] == pytest.approx([w["score"] for w in want], abs=ATOL)
        found += len(want)
    assert found > 0


def check_clip(srv: FamilyServer, model: str, folder: Path) -> None:
    reference, image = clip_reference(folder), image_bytes("PNG")
    body = {"items": [{"text": "a photo of a cat"}, {"images": [{"data": image, "format": "png"}]}]}
    response = post(srv, f"/v1/encode/{model}", body)
    assert response.status_code == 200, response.text
    got = np.stack([item["dense"]["values"] for item in decode_msgpack(response.content)["items"]])
    np.testing.assert_allclose(got, np.stack([clip_text(reference, "a photo of a cat"), clip_image(reference, image)]),
                               atol=ATOL)


CHECKS: dict[str, Callable[[FamilyServer, str, Path], None]] = {
    "org/dense": check_dense, "org/splade": check_sparse, "org/mlm": check_sparse,
    "org/colbert": check_colbert("stanford"), "org/colbert-pylate": check_colbert("pylate"),
    "org/bge-m3": check_bge_m3, "org/reranker": check_reranker, "org/nli": check_nli,
    "org/sentiment": check_sentiment, "org/ner": check_ner, "org/gliner": check_gliner, "org/clip": check_clip,
}


def families(srv: FamilyServer) -> dict[str, str]:
    return {m["name"]: m["family"] for m in httpx.get(f"{srv.url}/v1/models").json()["models"]}


@pytest.mark.parametrize("repo", list(REPOS))
def test_a_hub_id_downloads_and_serves_its_family(hub_server: FamilyServer, repo: str) -> None:
    assert families(hub_server)[repo] == REPOS[repo][1]
    CHECKS[repo](hub_server, repo, hub_server.folders[repo])


def test_every_repo_came_from_the_hub_and_the_log_says_why_each_family(hub_server: FamilyServer,
                                                                       hub: LoopbackHub) -> None:
    assert set(families(hub_server)) == set(REPOS)
    downloads = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    downloaded = {path.split("/resolve/")[0] for path in downloads}
    assert downloaded == set(REPOS)
    log = hub_server.server.log_path.read_text()
    for repo, (_, family) in REPOS.items():
        assert f"{repo}: {family} adapter, because of" in log
        assert f"downloaded {repo}:" in log


def test_a_request_never_downloads_a_repo_the_operator_did_not_name(hub_server: FamilyServer,
                                                                    hub: LoopbackHub) -> None:
    response = httpx.post(f"{hub_server.url}/v1/embeddings", json={"model": UNSERVED, "input": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert httpx.post(f"{hub_server.url}/v1/encode/{UNSERVED}", json={"items": [{"text": "x"}]}).status_code == 404
    assert not [path for _, path in hub.requests if UNSERVED in path]


@pytest.mark.parametrize("repo", LOCAL)
def test_the_same_folder_by_local_path_answers_the_same(local_server: FamilyServer, folders: dict[str, Path],
                                                        repo: str) -> None:
    name = str(folders[repo])
    assert families(local_server)[name] == REPOS[repo][1]
    CHECKS[repo](local_server, name, folders[repo])


# -- failures ----------------------------------------------------------------------------------------------------------


def failed_start(args: list[str], env: dict[str, str | None], log: Path) -> tuple[int, str, float]:
    """(exit status, log, seconds) of a server that must exit by itself."""
    started = time.monotonic()
    server = Server(args, env=env, log=log)
    try:
        server.process.wait(timeout=120)
    finally:
        server.stop()
    return int(server.process.returncode), log.read_text(), time.monotonic() - started


@pytest.mark.parametrize("endpoint", ["hub", "closed port"])
def test_a_model_that_cannot_be_found_stops_the_server_with_one_reason(hub: LoopbackHub, tmp_path: Path,
                                                                       endpoint: str) -> None:
    from tests.server import free_port

    env = online_env(hub, tmp_path / "hf-home")
    if endpoint == "closed port":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    code, log, _ = failed_start(["-m", "org/no-such-model"], env, tmp_path / "log")
    assert code == 1
    assert "Traceback" not in log
    reason = next(line for line in log.splitlines() if "cannot start" in line)
    assert "'org/no-such-model'" in reason and str(env["HF_ENDPOINT"]) in reason
    for place in ("local folder", "Hugging Face cache", "installed packages", "hub download"):
        assert place in reason


def test_files_of_no_known_family_stop_the_server_and_say_how_to_name_it(tmp_path: Path) -> None:
    folder = tiny.build_bge_m3(tmp_path / "half-bge-m3")
    (folder / "sparse_linear.pt").unlink()  # BGE-M3's ColBERT head alone: never served as dense
    code, log, _ = failed_start(["-m", str(folder)], {}, tmp_path / "log")
    assert code == 1 and "Traceback" not in log
    reason = next(line for line in log.splitlines() if "cannot start" in line)
    assert "colbert_linear.pt" in reason and "--adapter" in reason


def test_other_models_keep_serving_while_a_bundle_model_downloads(folders: dict[str, Path], tmp_path: Path) -> None:
    """A bundle model is downloaded on its first request, in a thread: the fake model answers all the while."""
    from concurrent.futures import ThreadPoolExecutor

    bundle = make_bundle(tmp_path / "bundle", "fake.yaml")
    (bundle / "slow.yaml").write_text("sie_id: test/slow-download\nhf_id: org/dense\n"
                                      "tasks: {encode: {dense: {dim: 32}}}\nprofiles: {default: {adapter: dense}}\n")
    with LoopbackHub({"org/dense": folders["org/dense"]}, file_delay_s=3.0) as slow_hub:
        srv = Server(["--bundle", str(bundle), "--preload", "test/fake-dense"],
                     env=online_env(slow_hub, tmp_path / "hf-home"), log=tmp_path / "log")
        try:
            url = srv.wait_ready(timeout=180).url
            with ThreadPoolExecutor(2) as pool:
                # Two requests for the cold model while it downloads: one download between them.
                cold = [pool.submit(httpx.post, f"{url}/v1/embeddings",
                                    json={"model": "test/slow-download", "input": "x"}, timeout=120)
                        for _ in range(2)]
                answered_meanwhile = 0
                while not all(f.done() for f in cold):
                    fake = httpx.post(f"{url}/v1/embeddings", json={"model": "test/fake-dense", "input": "x"})
                    answered_meanwhile += fake.status_code == 200
                    time.sleep(0.2)
            assert [f.result().status_code for f in cold] == [200, 200]
            assert answered_meanwhile >= 3  # the router kept answering through a download of 3 s or more
            gets = [path for method, path in slow_hub.requests if method == "GET" and "/resolve/" in path]
            assert len(gets) == len(set(gets))
        finally:
            srv.stop()
