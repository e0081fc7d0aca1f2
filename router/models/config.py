"""The model-config schema (router process): SIE's YAML files as typed Structs, parsed and checked when a bundle loads.

A profile's adapter is named (`adapter`) or found from SIE's `adapter_path`; its options are checked against its
family's option Struct. `inference` builds the same `ModelConfig` from a local folder's files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml

from sie_router.models.adapter_options import check_options
from sie_worker.options import GPU_MAX_BATCH_TOKENS, MAX_BATCH_TOKENS, Common

log = logging.getLogger("sie.registry")

# Keys of upstream SIE configs that we accept and ignore (logged once), so users can bring their files.
IGNORED_KEYS = frozenset({"adaptive_batching", "routing", "pool", "description", "license", "tags", "revision",
                          "default_profile", "memory", "quantization"})

# SIE `adapter_path` module names -> our family names.
ADAPTER_PATH_FAMILIES = {
    "sentence_transformer": "dense", "dense": "dense", "splade_flash": "sparse", "splade": "sparse",
    "sparse": "sparse", "colbert": "multivector", "multivector": "multivector", "cross_encoder": "cross_encoder",
    "bert_flash_cross_encoder": "cross_encoder", "clip": "clip", "fake": "fake", "bge_m3": "hybrid",
    "gliner": "gliner", "token_classification": "ner", "sequence_classification": "classifier",
}


class AdapterOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    loadtime: dict[str, Any] = {}
    runtime: dict[str, Any] = {}


class Profile(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One way of running a model; `default` is required."""

    adapter: str | None = None
    adapter_path: str | None = None
    max_batch_tokens: int | None = None
    compute_precision: str | None = None
    adapter_options: AdapterOptions = msgspec.field(default_factory=AdapterOptions)
    extends: str | None = None


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One model, in SIE's model-config schema plus our extensions `package_dir` and `memory_mb`."""

    sie_id: str
    profiles: dict[str, Profile]
    hf_id: str | None = None
    weights_path: str | None = None
    package_backed: bool = False
    package_dir: str | None = None  # "<python package>/<folder>": weights shipped inside an installed package
    hf_revision: str | None = None
    inputs: dict[str, bool] = {}
    tasks: dict[str, Any] = {}
    max_sequence_length: int | None = None
    memory_mb: int | None = None  # memory estimate reserved before the worker reports its measured figure
    source: str = ""  # where the config came from (a file, or an inferred folder)

    def family(self, profile: str = "default") -> str:
        p = self.profiles[profile]
        if p.adapter:
            return p.adapter
        module = (p.adapter_path or "").split(":")[0].rsplit(".", 1)[-1]
        for prefix, family in ADAPTER_PATH_FAMILIES.items():
            if module.startswith(prefix):
                return family
        if module.startswith("nli_classification"):
            return "classifier"
        raise ValueError(f"{self.source}: profile {profile!r} has no adapter and an unmapped adapter_path "
                         f"{p.adapter_path!r}")

    def options(self, profile: str = "default", server: Mapping[str, Any] | None = None) -> Common:
        """The profile's adapter options as its family's Struct, over the `server` settings of the same names."""
        chosen = self.profiles[profile].adapter_options
        return check_options(self.family(profile), chosen.loadtime, chosen.runtime, server)

    def max_batch_tokens(self, profile: str = "default", gpu: bool = False) -> int:
        """The profile's token budget per batch, else the default one (for a GPU when `gpu`)."""
        return self.profiles[profile].max_batch_tokens or (GPU_MAX_BATCH_TOKENS if gpu else MAX_BATCH_TOKENS)

    @property
    def outputs(self) -> list[str]:
        encode = self.tasks.get("encode") or {}
        found = [kind for kind in ("dense", "sparse", "multivector") if encode.get(kind) is not None]
        if self.tasks.get("score") is not None:
            found.append("score")
        if self.tasks.get("extract") is not None:
            found.append("json")
        return found

    @property
    def dims(self) -> dict[str, int]:
        encode = self.tasks.get("encode") or {}
        return {k: int(v["dim"]) for k, v in encode.items() if isinstance(v, dict) and v.get("dim") is not None}

    @property
    def input_kinds(self) -> list[str]:
        flags = {"text": True, **self.inputs}
        return [k for k in ("text", "image", "audio", "video", "document") if flags.get(k)]


def _resolve_extends(cfg: ModelConfig) -> ModelConfig:
    resolved: dict[str, Profile] = {}
    for name, profile in cfg.profiles.items():
        if profile.extends:
            parent = cfg.profiles.get(profile.extends)
            if parent is None or parent.extends:
                raise ValueError(f"{cfg.source}: profile {name!r} extends {profile.extends!r}, which is missing or "
                                 "extends another profile (one level only)")
            options = AdapterOptions(
                loadtime=profile.adapter_options.loadtime or parent.adapter_options.loadtime,
                runtime=profile.adapter_options.runtime or parent.adapter_options.runtime)
            profile = msgspec.structs.replace(
                parent, **{k: v for k, v in msgspec.structs.asdict(profile).items()
                           if v is not None and k not in ("adapter_options", "extends")},
                adapter_options=options, extends=None)
        resolved[name] = profile
    return msgspec.structs.replace(cfg, profiles=resolved)


def parse_config(raw: dict[str, Any], source: str) -> ModelConfig:
    """Validate one YAML document; unknown keys are an error naming the file and the key."""
    ignored = sorted(set(raw) & IGNORED_KEYS)
    if ignored:
        log.info("%s: ignoring SIE keys we do not use: %s", source, ", ".join(ignored))
    data = {k: v for k, v in raw.items() if k not in IGNORED_KEYS}
    try:
        cfg = msgspec.convert({**data, "source": source}, ModelConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{source}: {exc}") from None
    if "default" not in cfg.profiles:
        raise ValueError(f"{source}: profiles must include 'default'")
    if not (cfg.hf_id or cfg.weights_path or cfg.package_backed or cfg.package_dir):
        raise ValueError(f"{source}: one of hf_id, weights_path, package_dir or package_backed is required")
    cfg = _resolve_extends(cfg)
    for name in cfg.profiles:
        cfg.family(name)  # fails early on an unmapped adapter
        try:  # and on options its family does not have
            cfg.options(name)
        except ValueError as exc:
            raise ValueError(f"{source}: profile {name!r}: {exc}") from None
    return cfg


def load_bundle(directory: Path) -> list[ModelConfig]:
    configs: list[ModelConfig] = []
    for path in sorted(directory.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                configs.append(parse_config(document, str(path)))
    return configs
