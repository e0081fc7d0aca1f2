"""Hub downloads (router/models/hub.py, through router/models/weights.py) from tests/hub.py, by the real
huggingface_hub client."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from huggingface_hub import constants

from sie_router.models import hub as downloads
from sie_router.models.weights import WeightsNotFound, WeightsQuery, resolve_weights
from tests import tiny_models as tiny
from tests.hub import LoopbackHub
from tests.server import free_port

FAST_FAILURE_S = 10.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_colbert_pylate(tmp_path_factory.mktemp("hub") / "pylate")


@pytest.fixture
def hub(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHub]:
    """The loopback hub as huggingface_hub's endpoint, an empty cache, and the network allowed."""
    with LoopbackHub({"org/pylate": checkpoint}) as running:
        use(running, tmp_path / "cache", monkeypatch)
        yield running


def use(hub: LoopbackHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE=0 set when huggingface_hub is imported."""
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def files(folder: Path) -> int:
    return sum(path.is_file() for path in folder.rglob("*"))


def file_gets(hub: LoopbackHub) -> list[str]:
    return [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]


def test_a_hub_id_downloads_once_then_resolves_from_the_cache(hub: LoopbackHub, checkpoint: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sie.hub"):
        folder, origin = resolve_weights(WeightsQuery(model_id="org/pylate"), offline=False)
    assert origin == f"hub download from {hub.url}"
    for name in ("config.json", "model.safetensors", "1_Dense/model.safetensors", "modules.json"):
        assert (folder / name).read_bytes() == (checkpoint / name).read_bytes()
    assert any(f"downloaded org/pylate: {files(checkpoint)} file(s)" in r.message for r in caplog.records)
    gets = len(file_gets(hub))
    assert resolve_weights(WeightsQuery(model_id="org/pylate"), offline=True) == (folder, "Hugging Face cache")
    assert len(file_gets(hub)) == gets


def test_a_slow_download_logs_files_and_bytes_every_few_seconds(checkpoint: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(downloads, "PROGRESS_EVERY_S", 0.2)
    with LoopbackHub({"org/pylate": checkpoint}, file_delay_s=1.0) as slow:
        use(slow, tmp_path / "cache", monkeypatch)
        with caplog.at_level(logging.INFO, logger="sie.hub"):
            downloads.download("org/pylate", None)
    progress = [r for r in caplog.records if r.message.startswith("downloading org/pylate: ")]
    assert len(progress) >= 2 and all(" MB after " in r.message for r in progress)
    gaps = [b.created - a.created for a, b in itertools.pairwise(progress)]
    assert min(gaps) >= 0.15  # at most one line per period
    (done,) = [r.message for r in caplog.records if r.message.startswith("downloaded org/pylate")]
    assert f"{files(checkpoint)} file(s)" in done and " in " in done


def test_concurrent_loads_of_one_cold_model_download_it_once(hub: LoopbackHub, checkpoint: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        folders = set(pool.map(lambda _: downloads.download("org/pylate", None), range(4)))
    assert len(folders) == 1
    gets = file_gets(hub)
    assert len(gets) == len(set(gets)) == files(checkpoint)  # every file fetched, none twice


def test_offline_never_asks_the_hub(hub: LoopbackHub) -> None:
    with pytest.raises(WeightsNotFound, match="offline"):
        resolve_weights(WeightsQuery(model_id="org/pylate"), offline=True)
    assert hub.requests == []


@pytest.mark.parametrize("where", ["unknown repo", "closed port"])
def test_a_model_the_hub_cannot_give_fails_fast_naming_model_endpoint_and_places(
        hub: LoopbackHub, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    if where == "closed port":
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(WeightsNotFound) as caught:
        resolve_weights(WeightsQuery(model_id="org/missing"), offline=False)
    assert time.monotonic() - started < FAST_FAILURE_S
    message, failure = str(caught.value), caught.value
    assert "'org/missing'" in message and constants.ENDPOINT in message and not failure.transient
    # Only a hub that did not answer at all is worth asking again later (the pool's NETWORK class, with a cooldown).
    assert failure.unreachable is (where == "closed port")
    for place in ("local folder", "Hugging Face cache", "installed packages", "hub download"):
        assert place in message


def test_a_path_is_never_sent_to_the_hub(hub: LoopbackHub) -> None:
    with pytest.raises(WeightsNotFound, match="not a hub repo id"):
        resolve_weights(WeightsQuery(model_id="../../no/such/folder"), offline=False)
    assert hub.requests == []


def test_an_overloaded_hub_is_a_transient_failure_and_startup_retries_it(hub: LoopbackHub,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from sie_router import __main__ as cli

    hub.outage = 503
    with pytest.raises(WeightsNotFound) as caught:
        resolve_weights(WeightsQuery(model_id="org/pylate"), offline=False)
    assert caught.value.transient and "HTTP 503" in str(caught.value)
    # Startup tries again (after a backoff) while the hub is down, and starts once it is back.
    waits: list[float] = []

    def back_after_two(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            hub.outage = None

    monkeypatch.setattr(cli.time, "sleep", back_after_two)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    settings = cli.settings_from(["-m", "org/pylate", "--bundle", "test"])
    registry = cli.startup_registry(settings)
    assert registry.named == ("org/pylate",) and registry.configs["org/pylate"].family() == "multivector"
    assert waits == [2, 4]


def test_a_model_card_is_read_once_its_weights_exist_not_cached_empty_before(tmp_path: Path) -> None:
    from sie_router.models.config import ModelConfig, Profile
    from sie_router.models.model_card import model_card

    folder = tmp_path / "not-yet-downloaded"
    config = ModelConfig(sie_id="org/late-card", weights_path=str(folder),
                         profiles={"default": Profile(adapter="classifier")})
    assert model_card(config).id2label == {}
    folder.mkdir()
    (folder / "config.json").write_text('{"id2label": {"0": "negative", "1": "positive"}}')
    assert model_card(config).id2label == {"0": "negative", "1": "positive"}
