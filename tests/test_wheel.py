"""The package outside the checkout: a wheel built from the repo, installed into a fresh venv and run from a temporary
folder, serves a default-bundle model by its hub id, the bundle's YAML read from the installed package data."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests import precision
from tests import tiny_models as tiny
from tests.hub import LoopbackHub
from tests.server import ROOT, Server

BUNDLED = "BAAI/bge-small-en-v1.5"  # a default-bundle model: CLS pooling and normalisation, as build_dense_st's


def run(*args: str | Path) -> None:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the wheel; the dependencies come from this venv's site-packages through a .pth."""
    root = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", root / "dist", ROOT)
    (wheel,) = (root / "dist").glob("sie-*.whl")
    run(sys.executable, "-m", "venv", "--without-pip", root / "venv")
    site = next((root / "venv" / "lib").glob("python3*/site-packages"))
    # Every site-packages this process sees (a venv layered over another has two); their .pth files are not run, so
    # no editable install of the checkout leaks in.
    (site / "zz_dependencies.pth").write_text("".join(f"{p}\n" for p in sys.path if p.endswith("site-packages")))
    run(sys.executable, "-m", "pip", "--python", root / "venv" / "bin" / "python", "install", "--quiet", "--no-deps",
        wheel)
    return root / "venv"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 512 positions: the bundle's max_sequence_length for this model, which the worker warms up to.
    return tiny.build_dense_st(tmp_path_factory.mktemp("wheel-hub") / "bge-small", positions=512)


@pytest.fixture(scope="module")
def served(venv: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with LoopbackHub({BUNDLED: checkpoint}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(elsewhere / "hf-home"), "HF_HUB_CACHE": None,
               "HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "PYTHONPATH": None}
        server = Server(["-m", BUNDLED], env=env, log=elsewhere / "server.log",
                        command=[str(venv / "bin" / "sie-server")], cwd=elsewhere)
        try:
            yield server.wait_ready(timeout=180)
        finally:
            server.stop()


def test_the_installed_package_is_the_one_that_runs(venv: Path) -> None:
    where = subprocess.run([venv / "bin" / "python", "-c", "import sie_router.models.registry as r; print(r.__file__, "
                            "r.BUNDLES_ROOT)"], capture_output=True, text=True, cwd="/", check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where)
    assert (Path(where[1]) / "default" / "bge-small-en-v1.5.yaml").is_file()


def test_a_wheel_run_elsewhere_serves_a_bundle_model_by_its_hub_id(served: Server, checkpoint: Path) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["what is the capital of france", "berlin is in germany"]
    response = httpx.post(f"{served.url}/v1/embeddings", json={"model": BUNDLED, "input": texts}, timeout=60)
    assert response.status_code == 200, response.text
    got = np.array([row["embedding"] for row in response.json()["data"]])
    want = SentenceTransformer(str(checkpoint), device="cpu").encode(texts)
    precision.assert_vectors_close(got, want)
    log = served.log_path.read_text()
    assert f"downloaded {BUNDLED}" in log
    assert "adapter, because of" not in log  # the bundle's config, not inference


def test_the_wheel_needs_and_serves_the_operator_dependencies(venv: Path, served: Server) -> None:
    """Swagger UI's assets and OpenTelemetry come with the router extra (the image installs it); /docs loads them from
    the installed distribution, not from our tree or a CDN."""
    requires = subprocess.run([venv / "bin" / "python", "-c", "import importlib.metadata as m; "
                               "print('\\n'.join(m.distribution('sie').requires))"], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    for name in ("swagger-ui-bundle-v2", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"):
        assert any(r.startswith(name) and 'extra == "router"' in r for r in requires), name
    assert any(r.startswith("opentelemetry-sdk") and 'extra == "worker"' in r for r in requires)
    asset = httpx.get(f"{served.url}/docs/swagger-ui-bundle.js")
    assert asset.status_code == 200 and "SwaggerUIBundle" in asset.text
