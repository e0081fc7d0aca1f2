"""`sie-server` command line: flags, Infinity aliases, environment defaults, helpful --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sie_router.__main__ import settings_from


def test_model_id_is_an_alias_of_m_and_v2_is_accepted() -> None:
    settings = settings_from(["v2", "--model-id", "a/b", "-m", "c/d", "--port", "9000"])
    assert settings.models == ("a/b", "c/d") and settings.port == 9000 and settings.host == "127.0.0.1"


def test_defaults_bind_loopback_on_8080(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIE_PORT", raising=False)
    settings = settings_from([])
    assert (settings.host, settings.port, settings.models) == ("127.0.0.1", 8080, ())


def test_environment_gives_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIE_PORT", "7000")
    monkeypatch.setenv("SIE_API_KEY", "secret")
    assert settings_from([]).port == 7000
    assert settings_from(["--port", "7001"]).port == 7001
    assert "secret" not in repr(settings_from([]))


def test_help_explains_every_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "sie_router", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--model-id", "--bundle", "--host", "--port", "--device", "offline first"):
        assert flag in out


def test_dtype_comes_from_the_flag_or_the_environment_and_is_checked(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SIE_DTYPE", raising=False)
    assert settings_from([]).dtype == "auto"
    assert settings_from(["--dtype", "bfloat16"]).dtype == "bfloat16"
    monkeypatch.setenv("SIE_DTYPE", "float16")
    assert settings_from([]).dtype == "float16"
    monkeypatch.setenv("SIE_DTYPE", "int4")
    with pytest.raises(SystemExit):
        settings_from([])
    assert "SIE_DTYPE must be one of auto, float32, bfloat16, float16, not 'int4'" in capsys.readouterr().err


def test_online_unless_told_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert settings_from([]).hf_offline is False  # the server downloads what it is asked to serve, as Infinity does
    offline = settings_from(["--offline"])
    assert offline.hf_offline is True and offline.extra_env["HF_HUB_OFFLINE"] == "1"  # workers never download
    for value, expected in (("1", True), ("ON", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert settings_from([]).hf_offline is expected


def test_served_names_and_adapters_pair_with_models_and_the_prefix_is_checked(
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_from(["-m", "a/b", "--served-model-name", "b", "-m", "./c", "--adapter", "auto",
                              "--adapter", "colbert", "--url-prefix", "/v1"])
    assert settings.models == ("a/b", "./c") and settings.served_names == ("b",)
    assert settings.adapters == ("auto", "colbert") and settings.url_prefix == "/v1"
    for bad in ("v1", "/v1/"):
        with pytest.raises(SystemExit):
            settings_from(["--url-prefix", bad])
        assert "--url-prefix must start with '/'" in capsys.readouterr().err


def test_engine_aliases_and_closed_values_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SIE_ENGINE", raising=False)
    assert settings_from(["--engine", "optimum"]).engine == "onnx"
    monkeypatch.setenv("SIE_ENGINE", "optimum")
    assert settings_from([]).engine == "onnx"
    assert settings_from(["--engine", "torch"]).engine == "torch"  # the flag wins
    for argv, named in ((["--engine", "bogus"], "--engine"), (["--device", "gpu"], "--device"),
                        (["--log-level", "loud"], "--log-level")):
        with pytest.raises(SystemExit):
            settings_from(argv)
        assert f"error: {named} must be one of " in capsys.readouterr().err


def test_a_bad_variable_stops_serve_with_one_sentence() -> None:
    env = {"PATH": "/usr/bin:/bin", "SIE_ENGINE": "bogus"}
    done = subprocess.run([sys.executable, "-m", "sie_router", "serve"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("sie-server: error: SIE_ENGINE must be one of auto, torch, onnx, openvino (or optimum, for "
                    "onnx), not 'bogus'")


def test_operator_flags_are_in_help_and_reach_settings() -> None:
    out = subprocess.run([sys.executable, "-m", "sie_router", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--json-output", "--access-log", "--otlp-endpoint", "--otlp-service-name", "--cors-allow-origin",
                 "--permissive-cors", "--model-store"):
        assert flag in out, flag
    settings = settings_from(["--json-output", "--access-log", "--otlp-endpoint", "http://otel:4318",
                              "--otlp-service-name", "embed", "--cors-allow-origin", "https://a.example",
                              "--cors-allow-origin", "http://b.example:3000", "--permissive-cors",
                              "--model-store", "/var/lib/sie/models.json"])
    assert (settings.log_format, settings.access_log, settings.permissive_cors) == ("json", True, True)
    assert (settings.otlp_endpoint, settings.otlp_service_name) == ("http://otel:4318/v1/traces", "embed")
    assert settings.cors_allow_origins == ("https://a.example", "http://b.example:3000")
    assert str(settings.model_store) == "/var/lib/sie/models.json"
    closed = settings_from([])
    assert (closed.log_format, closed.otlp_endpoint, closed.cors_allow_origins, closed.model_store) == (
        "text", None, (), None)


def test_a_bad_origin_names_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings_from(["--cors-allow-origin", "https://a.example/app"])
    assert "--cors-allow-origin: 'https://a.example/app' is not an origin" in capsys.readouterr().err


def test_custom_code_runs_only_when_the_server_trusts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--trust-remote-code` (or SIE_TRUST_REMOTE_CODE) reaches every worker's spec; off by default."""
    import asyncio

    from sie_router.models.registry import build_registry
    from sie_router.pool.devices import detect
    from sie_router.pool.launch import worker_spec
    from sie_router.pool.pool import WorkerPool

    monkeypatch.delenv("SIE_TRUST_REMOTE_CODE", raising=False)
    for argv, trusted in (([], False), (["--trust-remote-code"], True)):
        settings = settings_from([*argv, "--bundle", "test"])
        assert settings.trust_remote_code is trusted
        pool = WorkerPool(settings, build_registry("test", (), (), offline=True), detect("cpu"))
        try:
            spec = worker_spec(settings, pool.devices, pool.supervisor.worker_endpoints,
                               pool.registry.configs["test/fake-dense"], "", "cpu", None)
            assert spec.trust_remote_code is trusted
        finally:
            asyncio.run(pool.supervisor.close())
