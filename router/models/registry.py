"""Model configs (router process): bundles of SIE model-config YAML files, plus configs inferred from local folders.

Each non-default profile is also served as `<sie_id>:<profile>`. Every registration remembers where it came from: the
bundle, `-m`, or runtime (`POST /admin/models`, `sie_router.pipeline.catalog`, the only caller of `add` and `remove`
after startup).
"""

from __future__ import annotations

import difflib
from enum import StrEnum
from pathlib import Path

import msgspec

from sie_router.errors import SIEError
from sie_router.models.adapter_options import check_options
from sie_router.models.config import ADAPTER_PATH_FAMILIES, AdapterOptions, ModelConfig, load_bundle
from sie_router.models.inference import FAMILIES, infer_config
from sie_sdk.codes import ErrorCode
from sie_sdk.types import AddModelRequest


def _bundles_root() -> Path:
    """`sie_router/bundles` in an installed wheel (package data), else `bundles/` of the checkout."""
    package = Path(__file__).resolve().parent.parent
    shipped = package / "bundles"
    return shipped if shipped.is_dir() else package.parent / "bundles"


BUNDLES_ROOT = _bundles_root()

class Origin(StrEnum):
    """Where a registration came from, as `GET /admin/models` shows it."""

    BUNDLE = "bundle"
    CLI = "-m"
    RUNTIME = "runtime"


def served_names(cfg: ModelConfig) -> list[str]:
    """The names a config answers under: its id, and `<id>:<profile>` for each other profile."""
    return [cfg.sie_id if profile == "default" else f"{cfg.sie_id}:{profile}" for profile in cfg.profiles]


class Registry:
    """Served model ids -> (config, profile name)."""

    def __init__(self, configs: list[ModelConfig], named: tuple[str, ...] = (), origin: Origin = Origin.BUNDLE,
                 bundle: list[ModelConfig] | None = None) -> None:
        self.configs: dict[str, ModelConfig] = {}
        self.served: dict[str, tuple[ModelConfig, str]] = {}
        self.origins: dict[str, Origin] = {}
        self.named = named  # the served names of the -m models, in order: the server is ready once they have loaded
        # Every model of the bundle, served or not: a runtime registration may name one by its id or its hub id.
        self.bundle = {cfg.sie_id: cfg for cfg in (configs if bundle is None else bundle)}
        self.load_at_start: list[str] = []  # runtime models kept with `load` (`--model-store`), loaded like --preload
        self.generation = 0  # counts changes, so that what is derived from the registry can tell it is stale
        for cfg in configs:
            self.add(cfg, origin)

    def add(self, cfg: ModelConfig, origin: Origin = Origin.BUNDLE) -> None:
        if cfg.sie_id in self.configs:
            first = self.configs[cfg.sie_id].source
            raise ValueError(f"{cfg.source}: model {cfg.sie_id!r} is already defined in {first}")
        taken = [name for name in served_names(cfg) if name in self.served]
        if taken:
            raise ValueError(f"{cfg.source}: {taken[0]!r} is already served by {self.served[taken[0]][0].source}")
        self.configs[cfg.sie_id] = cfg
        self.origins[cfg.sie_id] = origin
        for name, profile in zip(served_names(cfg), cfg.profiles, strict=True):
            self.served[name] = (cfg, profile)
        self.generation += 1

    def remove(self, sie_id: str) -> ModelConfig:
        """Unregister a model and its profiles: from now on its names are MODEL_NOT_FOUND."""
        cfg = self.configs.pop(sie_id)
        self.origins.pop(sie_id, None)
        for name in served_names(cfg):
            self.served.pop(name, None)
        self.generation += 1
        return cfg

    def lookup(self, name: str) -> tuple[ModelConfig, str]:
        """The config and profile a served name stands for. Pure: the request's metric label is set by the route
        (`sie_router.pipeline.resolve`), never here, so a batcher task calling the pool cannot write into a
        request's labels."""
        try:
            found = self.served[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.served), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise SIEError(ErrorCode.MODEL_NOT_FOUND, f"Model '{name}' not found.{hint}", param="model") from None
        return found

    def restrict(self, names: list[str]) -> Registry:
        """A registry of just these models (all their profiles)."""
        return Registry([self.configs[n] for n in names], bundle=list(self.bundle.values()))

    def in_bundle(self, model: str) -> ModelConfig | None:
        """The bundle's config for a model named by its SIE id or its hub id, served or not."""
        return self.bundle.get(model) or next((c for c in self.bundle.values() if c.hf_id == model), None)


def build_registry(bundle: str, bundle_dirs: tuple[Path, ...], models: tuple[str, ...], *, offline: bool,
                   served_names: tuple[str, ...] = (), adapters: tuple[str, ...] = ()) -> Registry:
    """The bundle's models, restricted to `models` when given; a model outside the bundle is inferred from its files.

    `served_names` and `adapters` pair with `models` in order (`--served-model-name`, `--adapter`)."""
    directory = next((d / bundle for d in (*bundle_dirs, BUNDLES_ROOT) if (d / bundle).is_dir()), None)
    if directory is None and Path(bundle).is_dir():
        directory = Path(bundle)
    if directory is None:
        raise ValueError(f"bundle {bundle!r} not found under {[str(d) for d in (*bundle_dirs, BUNDLES_ROOT)]}")
    registry = Registry(load_bundle(directory))
    if not models:
        return registry
    if len(served_names) > len(models) or len(adapters) > len(models):
        raise ValueError("each --served-model-name and --adapter pairs with one -m, in order; there are more of them "
                         f"than models ({len(models)})")
    chosen: list[ModelConfig] = []
    named: list[str] = []
    for i, model in enumerate(models):
        adapter = adapters[i] if i < len(adapters) and adapters[i] != "auto" else None
        base = model.split(":")[0] if model not in registry.configs and ":" in model else model
        cfg = registry.in_bundle(base)  # a bundle model, by its SIE id or its hub id
        if cfg is None or adapter:
            cfg = infer_config(model, offline=offline, adapter=adapter)
        chosen.append(served_as(cfg, served_names[i]) if i < len(served_names) else cfg)
        profile = model.split(":")[1] if base != model and cfg is registry.configs.get(base) else None
        named.append(chosen[-1].sie_id + (f":{profile}" if profile else ""))
    return Registry(list({c.sie_id: c for c in chosen}.values()), named=tuple(named), origin=Origin.CLI,
                    bundle=list(registry.bundle.values()))


def runtime_config(registry: Registry, request: AddModelRequest, *, offline: bool) -> ModelConfig:
    """The config a runtime registration stands for, found as `-m` finds its models (the bundle, by SIE id or hub id;
    else inferred from its files, which may download it: the operator named it), named and tuned as it says.
    ValueError says why a model or an option cannot work; `WeightsNotFound` that its files are not to be had."""
    adapter = request.adapter if request.adapter not in (None, "auto") else None
    if adapter and ADAPTER_PATH_FAMILIES.get(adapter, adapter) not in FAMILIES:  # before any download
        raise ValueError(f"unknown adapter {adapter!r}; families: {', '.join(FAMILIES)}")
    cfg = registry.in_bundle(request.model)
    if cfg is None or adapter:
        cfg = infer_config(request.model, offline=offline, adapter=adapter)
    if request.served_model_name:
        cfg = served_as(cfg, request.served_model_name)
    default = cfg.profiles["default"]
    options = AdapterOptions(loadtime={**default.adapter_options.loadtime, **request.loadtime},
                             runtime={**default.adapter_options.runtime, **request.runtime})
    check_options(cfg.family(), options.loadtime, options.runtime)
    tuned = msgspec.structs.replace(
        default, adapter_options=options, max_batch_tokens=request.max_batch_tokens or default.max_batch_tokens,
        compute_precision=request.compute_precision or default.compute_precision)
    return msgspec.structs.replace(cfg, profiles={**cfg.profiles, "default": tuned},
                                   source=f"{cfg.source} (added at runtime)")


# -- served names (`--served-model-name`) --------------------------------------------------------------------------


def served_as(cfg: ModelConfig, name: str) -> ModelConfig:
    """`cfg` answering under `name` on every API; its weights are still found by the id it was configured with."""
    hub_id = cfg.hf_id or (None if cfg.weights_path or cfg.package_dir else cfg.sie_id)
    return msgspec.structs.replace(cfg, sie_id=name, hf_id=hub_id, source=f"{cfg.source} (served as {name!r})")
