"""The Helm chart's own pod spec, rendered by real Helm, run in the image by `docker run` (tests/container/pods.py):
the startup, readiness and liveness probes pass as rendered, a request answers, and SIGTERM after the preStop sleep
ends the pod with exit 0 within terminationGracePeriodSeconds. Default values (one pool), and two pools where one
forwards to the other, both pods up at once on their own loopback ports."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.container.docker import ENABLED, IMAGE, SKIP_REASON, Container
from tests.container.pods import PodPlan, plan
from tests.deploy.test_chart import kinds, render
from tests.server import MINILM, free_port

pytestmark = [pytest.mark.container, pytest.mark.skipif(not ENABLED, reason=SKIP_REASON)]

FORWARDING = yaml.safe_load((Path(__file__).parent / "forwarding-pools.yaml").read_text())
BACK_MODEL = "sie-test/minilm-back"


def plans(values: dict[str, Any], folder: Path) -> dict[str, PodPlan]:
    """One plan per pool Deployment, keyed by pool name, each on a free loopback port."""
    docs = render(values)
    configmaps = {d["metadata"]["name"]: d for d in kinds(docs, "ConfigMap")}
    deployments = {d["metadata"]["labels"]["sie/pool"]: d for d in kinds(docs, "Deployment")}
    ports = {pool: free_port() for pool in deployments}
    hosts = {f"{d['metadata']['name']}.sie.svc": ports[pool] for pool, d in deployments.items()}
    return {pool: plan(d, configmaps, ports[pool], hosts, folder) for pool, d in deployments.items()}


@contextlib.contextmanager
def running(pods: dict[str, PodPlan]) -> Iterator[dict[str, Container]]:
    """Every pod started at once (as a rollout would), then each waited for through its startup probe."""
    containers: dict[str, Container] = {}
    try:
        for pool, pod in pods.items():
            assert pod.image == IMAGE, "the chart's default image is the one `make image` builds"
            containers[pool] = pod.start()
        for pool, pod in pods.items():
            seconds = pod.wait_started(containers[pool])
            print(f"pod {pod.name}: startup probe passed after {seconds:.1f} s")
        yield containers
    finally:
        for container in containers.values():
            container.remove()


def embed(port: int, model: str, texts: list[str]) -> tuple[httpx.Response, np.ndarray]:
    response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": model, "input": texts}, timeout=120)
    assert response.status_code == 200, response.text
    return response, np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def check_probes_and_terminate(pod: PodPlan, container: Container) -> None:
    assert pod.probe(container, "readiness") and pod.probe(container, "liveness")
    # everything the server writes found a writable place: the cache emptyDir (not a fallback) and /tmp
    logs = container.logs()
    assert "not writable" not in logs and "Read-only file system" not in logs, logs[-3000:]
    elapsed, code = pod.terminate(container)
    assert code == 0, container.logs()[-3000:]
    assert elapsed < pod.grace_s, f"{pod.name} took {elapsed:.1f} s of its {pod.grace_s} s grace period"
    print(f"pod {pod.name}: terminated in {elapsed:.1f} s (preStop {pod.pre_stop_sleep_s} s), grace {pod.grace_s} s")


def test_the_default_values_pod_runs_in_the_image(image: str, tmp_path: Path) -> None:
    pods = plans({}, tmp_path)
    assert list(pods) == ["default"]
    pod = pods["default"]
    # the rendered contract this run honours
    flags = dict(zip(pod.docker_args, [*pod.docker_args[1:], ""], strict=True))
    assert "--read-only" in flags and flags["--cap-drop"] == "ALL" and flags["--user"] == "1000:1000"
    assert flags["--memory"] == str(8 << 30) and flags["--security-opt"] == "no-new-privileges"
    with running(pods) as containers:
        _, vectors = embed(pod.port, MINILM, ["hello", "world"])
        assert vectors.shape == (2, 384)
        check_probes_and_terminate(pod, containers["default"])


def test_two_pools_one_forwarding_to_the_other(image: str, tmp_path: Path) -> None:
    pods = plans(FORWARDING, tmp_path)
    assert sorted(pods) == ["back", "front"]
    front, back = pods["front"], pods["back"]
    with running(pods) as containers:
        texts = ["forwarded between pools", "in one hop"]
        relayed, through_front = embed(front.port, BACK_MODEL, texts)
        _, direct = embed(back.port, BACK_MODEL, texts)
        assert through_front.shape == (2, 384) and np.allclose(through_front, direct, atol=1e-5)
        # the front pod relayed it (counted as forwarded, answered 200) and the back pod answered it
        front_metrics = httpx.get(f"http://127.0.0.1:{front.port}/metrics", timeout=10).text
        assert any(line.startswith("sie_forwarded_requests_total{") and f'model="{BACK_MODEL}"' in line
                   and 'status="200"' in line and float(line.split()[-1]) >= 1 for line in front_metrics.splitlines())
        served = {m["name"] for m in httpx.get(f"http://127.0.0.1:{front.port}/v1/models", timeout=10).json()["models"]}
        assert served == {MINILM}
        _, own = embed(front.port, MINILM, texts)
        assert own.shape == (2, 384)
        assert relayed.status_code == 200
        for pool in ("front", "back"):
            check_probes_and_terminate(pods[pool], containers[pool])
