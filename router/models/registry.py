"""Model configs (router process): bundles of SIE model-config YAML files, plus configs inferred from local folders.

Read-only after startup. Each non-default profile is also served as `<sie_id>:<profile>`.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import msgspec

from sie_router.errors import SIEError
from sie_router.models.config import ModelConfig, load_bundle
from sie_router.models.inference import infer_config
from sie_sdk.codes import ErrorCode


def _bundles_root() -> Path:
    """`sie_router/bundles` in an installed wheel (package data), else `bundles/` of the checkout."""
    package = Path(__file__).resolve().parent.parent
    shipped = package / "bundles"
    return shipped if shipped.is_dir() else package.parent / "bundles"


BUNDLES_ROOT = _bundles_root()

class Registry:
    """Served model ids -> (config, profile name)."""

    def __init__(self, configs: list[ModelConfig], named: tuple[str, ...] = ()) -> None:
        self.configs: dict[str, ModelConfig] = {}
        self.served: dict[str, tuple[ModelConfig, str]] = {}
        self.named = named  # the served names of the -m models, in order: the server is ready once they have loaded
        for cfg in configs:
            self.add(cfg)

    def add(self, cfg: ModelConfig) -> None:
        if cfg.sie_id in self.configs:
            first = self.configs[cfg.sie_id].source
            raise ValueError(f"{cfg.source}: model {cfg.sie_id!r} is already defined in {first}")
        self.configs[cfg.sie_id] = cfg
        for profile in cfg.profiles:
            name = cfg.sie_id if profile == "default" else f"{cfg.sie_id}:{profile}"
            self.served[name] = (cfg, profile)

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
        return Registry([self.configs[n] for n in names])


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
    by_hub_id = {c.hf_id: c for c in registry.configs.values() if c.hf_id}
    chosen: list[ModelConfig] = []
    named: list[str] = []
    for i, model in enumerate(models):
        adapter = adapters[i] if i < len(adapters) and adapters[i] != "auto" else None
        base = model.split(":")[0] if model not in registry.configs and ":" in model else model
        cfg = registry.configs.get(base) or by_hub_id.get(base)  # a bundle model, by its SIE id or its hub id
        if cfg is None or adapter:
            cfg = infer_config(model, offline=offline, adapter=adapter)
        chosen.append(served_as(cfg, served_names[i]) if i < len(served_names) else cfg)
        profile = model.split(":")[1] if base != model and cfg is registry.configs.get(base) else None
        named.append(chosen[-1].sie_id + (f":{profile}" if profile else ""))
    return Registry(list({c.sie_id: c for c in chosen}.values()), named=tuple(named))


# -- served names (`--served-model-name`) --------------------------------------------------------------------------


def served_as(cfg: ModelConfig, name: str) -> ModelConfig:
    """`cfg` answering under `name` on every API; its weights are still found by the id it was configured with."""
    hub_id = cfg.hf_id or (None if cfg.weights_path or cfg.package_dir else cfg.sie_id)
    return msgspec.structs.replace(cfg, sie_id=name, hf_id=hub_id, source=f"{cfg.source} (served as {name!r})")
