"""Settings: a frozen Struct whose every field reads `SIE_<FIELD>`, older names kept as aliases, bad values refused."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from sie_router.settings import CHOICES, DERIVED, ENV_ALIASES, Settings, build_settings, env_defaults

SAMPLES = {int: "7", float: "0.25", str: "x", bool: "true"}


def test_every_field_reads_its_own_variable() -> None:
    for field in msgspec.structs.fields(Settings):
        if field.name in DERIVED:
            continue
        kind = type(field.default) if field.default is not None else str
        text = {tuple: "a;b"}.get(kind, SAMPLES.get(kind, "x"))
        if kind is bool:
            text = "false" if field.default else "true"
        if field.name == "pool_map":
            text = "/tmp/map.yaml"
        if field.name == "url_prefix":
            text = "/x"
        if field.name == "otlp_endpoint":
            text = "http://collector:4318"
        if field.name == "cors_allow_origins":
            text = "https://a.example;http://b.example:8080"
        if field.name in CHOICES:
            text = next(value for value in CHOICES[field.name] if value != field.default)
        built = build_settings(env_defaults({f"SIE_{field.name.upper()}": text}))
        assert getattr(built, field.name) != field.default, field.name


def test_old_names_still_work_and_the_new_name_wins() -> None:
    for field, alias in ENV_ALIASES.items():
        assert getattr(build_settings(env_defaults({alias: "123"})), field) == 123
        assert getattr(build_settings(env_defaults({alias: "123", f"SIE_{field.upper()}": "456"})), field) == 456


def test_types_sizes_and_paths_are_converted() -> None:
    settings = build_settings(env_defaults({"SIE_MEMORY_BUDGET": "2GiB", "SIE_BUNDLE_DIRS": "/a:/b",
                                            "SIE_MODELS": "m1;m2", "SIE_IDLE_TTL_S": "1.5"}))
    assert settings.memory_budget == 2 * 2**30 and settings.bundle_dirs == (Path("/a"), Path("/b"))
    assert settings.models == ("m1", "m2") and settings.idle_ttl_s == 1.5
    with pytest.raises(ValueError, match="port"):
        build_settings(env_defaults({"SIE_PORT": "eighty"}))


def test_settings_are_frozen_and_hide_secrets() -> None:
    settings = build_settings(env_defaults({"SIE_API_KEY": "hunter2", "SIE_ADMIN_TOKEN": "t0k"}))
    assert settings.api_key == "hunter2" and "hunter2" not in repr(settings) and "t0k" not in repr(settings)
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]
    assert "token_ids" not in Settings.__struct_fields__  # read nowhere, so deleted


def test_closed_fields_are_literals_and_refuse_other_values_naming_the_variable() -> None:
    assert set(CHOICES) >= {"engine", "dtype", "device", "log_level"}
    for field, allowed in CHOICES.items():
        for value in allowed:
            assert getattr(build_settings(env_defaults({f"SIE_{field.upper()}": value})), field) == value
        with pytest.raises(ValueError) as caught:
            build_settings(env_defaults({f"SIE_{field.upper()}": "bogus"}))
        assert str(caught.value).startswith(f"SIE_{field.upper()} must be one of {', '.join(allowed)}")
        assert str(caught.value).endswith(", not 'bogus'")


def test_aliases_apply_to_variables_and_flags_alike() -> None:
    assert build_settings(env_defaults({"SIE_ENGINE": "optimum"})).engine == "onnx"  # Infinity's name for ONNX RT
    assert build_settings({"engine": "optimum"}, {"engine": "--engine"}).engine == "onnx"
    with pytest.raises(ValueError, match=r"^--engine must be one of auto, torch, onnx, openvino \(or optimum, for "
                                         r"onnx\), not 'bogus'$"):
        build_settings({"engine": "bogus"}, {"engine": "--engine"})


def test_checks_that_span_values_name_their_source() -> None:
    with pytest.raises(ValueError, match=r"^SIE_URL_PREFIX must start with '/'"):
        build_settings(env_defaults({"SIE_URL_PREFIX": "v1"}))
    with pytest.raises(ValueError, match="cannot both be set"):
        build_settings(env_defaults({"SIE_DEFAULT_PROMPT": "a", "SIE_DEFAULT_PROMPT_NAME": "b"}))
    with pytest.raises(ValueError, match=r"^invalid setting SIE_PORT: "):
        build_settings(env_defaults({"SIE_PORT": "eighty"}))


def test_tracing_follows_opentelemetrys_variables_unless_ours_say() -> None:
    def endpoint(env: dict[str, str]) -> str | None:
        return build_settings(env_defaults(env)).otlp_endpoint

    assert endpoint({}) is None  # off by default
    assert endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/traces"
    assert endpoint({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces",
                     "OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318"}) == "http://c:4318/v1/traces"
    assert endpoint({"OTEL_TRACES_EXPORTER": "otlp"}) == "http://localhost:4318/v1/traces"
    assert endpoint({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) is None
    assert endpoint({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) is None
    assert endpoint({"SIE_OTLP_ENDPOINT": "http://ours:4318", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == (
        "http://ours:4318/v1/traces")
    named = build_settings(env_defaults({"OTEL_SERVICE_NAME": "theirs"}))
    assert named.otlp_service_name == "theirs"
    assert build_settings(env_defaults({"OTEL_SERVICE_NAME": "theirs", "SIE_OTLP_SERVICE_NAME": "ours"})
                          ).otlp_service_name == "ours"


def test_grpc_and_bad_endpoints_and_origins_are_refused() -> None:
    with pytest.raises(ValueError, match="OTLP/HTTP with protobuf only"):
        build_settings(env_defaults({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                     "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}))
    with pytest.raises(ValueError, match="SIE_OTLP_ENDPOINT must be an http"):
        build_settings(env_defaults({"SIE_OTLP_ENDPOINT": "collector:4318"}))
    for origin in ("https://a.example/", "a.example", "https://a.example/path", "ftp://a.example"):
        with pytest.raises(ValueError, match="is not an origin"):
            build_settings(env_defaults({"SIE_CORS_ALLOW_ORIGINS": origin}))
    assert build_settings(env_defaults({"SIE_CORS_ALLOW_ORIGINS": "*"})).cors_allow_origins == ("*",)
    assert build_settings(env_defaults({"SIE_LOG_FORMAT": "json"})).log_format == "json"
    with pytest.raises(ValueError, match="SIE_LOG_FORMAT must be one of text, json"):
        build_settings(env_defaults({"SIE_LOG_FORMAT": "yaml"}))
