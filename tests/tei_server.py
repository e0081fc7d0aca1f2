"""One real server for the TEI tests: MiniLM (embedding) first, then a tiny SPLADE, reranker and classifier.

The SPLADE checkpoint also carries a sentence-transformers `prompts` config, so prompt handling is tested for real.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests import tiny_extract_models, tiny_models
from tests.server import MINILM, ROOT, FamilyServer, Server

SPLADE, RERANKER, SENTIMENT = "test/splade", "test/reranker", "test/sentiment"
PROMPTS = {"query": "query: ", "passage": "passage: "}
CONFIGS = {
    SPLADE: (tiny_models.build_mlm, "tasks: {{encode: {{sparse: {{dim: {vocab}}}}}}}\n"
                                    "profiles: {{default: {{adapter: sparse}}}}\n"),
    RERANKER: (tiny_models.build_cross_encoder, "tasks: {{score: {{}}}}\n"
                                                "profiles: {{default: {{adapter: cross_encoder}}}}\n"),
    SENTIMENT: (tiny_extract_models.build_sentiment, "tasks: {{extract: {{}}}}\n"
                                                     "profiles: {{default: {{adapter: classifier}}}}\n"),
}
SERVED = (MINILM, SPLADE, RERANKER, SENTIMENT)


def start_tei_server(root: Path) -> FamilyServer:
    """Build the checkpoints and a bundle, and start serving them (the caller stops `server`)."""
    bundle = root / "bundle"
    bundle.mkdir(parents=True)
    (bundle / "minilm.yaml").write_text((ROOT / "bundles/default/all-minilm-l6-v2.yaml").read_text())
    folders = {}
    for sie_id, (build, body) in CONFIGS.items():
        folder = build(root / "models" / sie_id.split("/")[-1])
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        (bundle / f"{sie_id.split('/')[-1]}.yaml").write_text(
            f"sie_id: {sie_id}\nweights_path: {folder}\n" + body.format(vocab=vocab))
        folders[sie_id] = folder
    (folders[SPLADE] / "config_sentence_transformers.json").write_text(json.dumps({"prompts": PROMPTS}))
    models = [arg for model in SERVED for arg in ("-m", model)]
    server = Server(["--bundle", str(bundle), *models, "--max-client-batch-size", "8"], log=root / "server.log")
    return FamilyServer(server=server, folders=folders)
