"""Settings: a frozen Struct whose every field reads `SIE_<FIELD>`, older names kept as aliases, bad values refused."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from sie_router.settings import DERIVED, ENV_ALIASES, Settings, build_settings, env_defaults

SAMPLES = {int: "7", float: "0.5", str: "x", bool: "true"}


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
