"""What a checkpoint's sentence-transformers files declare, read in this one place (router and worker; stdlib only).

Reads `modules.json`, each module's `config.json` (Pooling, Dense, Normalize, SpladePooling),
`sentence_bert_config.json` and `config_sentence_transformers.json` (prompts), in the classic layout
(`sentence_transformers.models.*` types, one `pooling_mode_*` flag per mode, `max_seq_length`) and in the one
sentence-transformers 5 and 6 write (`sentence_transformers.base.modules.*` types, one `pooling_mode` key, and the
maximum length left in the tokenizer's own config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The classic Pooling config's flags, in sentence-transformers' order: several set flags concatenate their modes.
POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# Modules whose folder holds the Hugging Face model, not a config of their own.
INPUT_MODULES = ("Transformer", "MLMTransformer")


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _object(path: Path) -> dict[str, Any]:
    found = read_json(path)
    return found if isinstance(found, dict) else {}


@dataclass(frozen=True)
class Module:
    """One entry of `modules.json`."""

    kind: str  # the class name, whichever package path wrote it: Transformer, Pooling, Dense, SpladePooling, ...
    type: str  # the dotted name as written, e.g. `sentence_transformers.models.Pooling`
    folder: Path
    config: dict[str, Any]  # the module's own `config.json`; {} for the input modules and modules without one


@dataclass(frozen=True)
class Layout:
    """A checkpoint folder's sentence-transformers files; empty for a folder without them."""

    folder: Path
    modules: tuple[Module, ...]
    max_seq_length: int | None  # `sentence_bert_config.json`'s; the 5/6 layout leaves it to the tokenizer (None)
    config: dict[str, Any]  # `config_sentence_transformers.json`, for the keys a family reads itself (PyLate's)
    transformer: dict[str, Any] = field(default_factory=dict)  # the input module's `sentence_bert_config.json`

    def module(self, *kinds: str) -> Module | None:
        """The first module of one of these kinds."""
        return next((m for m in self.modules if m.kind in kinds), None)

    @property
    def kinds(self) -> list[str]:
        return [m.kind for m in self.modules]

    @property
    def pooling(self) -> tuple[str, ...] | None:
        """The Pooling module's modes in sentence-transformers' names (`cls`, `mean`, `lasttoken`, `max`, ...; more than
        one concatenates); None without a Pooling module."""
        module = self.module("Pooling")
        return None if module is None else pooling_modes(module.config)

    @property
    def normalize(self) -> bool:
        return self.module("Normalize") is not None

    @property
    def encoder_folder(self) -> Path:
        """Where the Hugging Face encoder is: the input module's folder, else the checkpoint's."""
        module = self.module(*INPUT_MODULES)
        return self.folder if module is None else module.folder

    @property
    def prompts(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in (self.config.get("prompts") or {}).items()}

    @property
    def default_prompt_name(self) -> str | None:
        name = self.config.get("default_prompt_name")
        return None if name is None else str(name)

    @property
    def cross_encoder_activation(self) -> str | None:
        """The activation a CrossEncoder applies to a one-label head: `config_sentence_transformers.json`'s
        `activation_fn` (5/6), else the model config's `sentence_transformers.activation_fn` (4) or
        `sbert_ce_default_activation_function` (older); None when none is named."""
        config = _object(self.folder / "config.json")
        name = (self.config.get("activation_fn") or (config.get("sentence_transformers") or {}).get("activation_fn")
                or config.get("sbert_ce_default_activation_function"))
        return None if name is None else str(name)


def pooling_modes(config: dict[str, Any]) -> tuple[str, ...]:
    """A Pooling config's modes: the 5/6 `pooling_mode` (a name or a list), else the classic flags, else mean (as
    sentence-transformers reads a classic config with no flag set)."""
    mode = config.get("pooling_mode")
    if isinstance(mode, str):
        return (mode,)
    if isinstance(mode, list) and mode:
        return tuple(str(m) for m in mode)
    return tuple(name for key, name in POOLING_FLAGS.items() if config.get(key)) or ("mean",)


def read_layout(folder: Path) -> Layout:
    """The sentence-transformers files of the checkpoint in `folder` (blocking file reads; a few small files)."""
    listed = read_json(folder / "modules.json")
    modules = []
    for entry in listed if isinstance(listed, list) else []:
        if not isinstance(entry, dict):
            continue
        kind_path = str(entry.get("type", ""))
        kind = kind_path.rsplit(".", 1)[-1]
        module_folder = folder / str(entry.get("path", ""))
        config = {} if kind in INPUT_MODULES else _object(module_folder / "config.json")
        modules.append(Module(kind=kind, type=kind_path, folder=module_folder, config=config))
    # The input module's own folder holds its config: the root in most checkpoints, `0_Transformer/` in early ones.
    encoder = next((m.folder for m in modules if m.kind in INPUT_MODULES), folder)
    transformer = _object(encoder / "sentence_bert_config.json")
    max_len = transformer.get("max_seq_length")
    return Layout(folder=folder, modules=tuple(modules), max_seq_length=int(max_len) if max_len else None,
                  config=_object(folder / "config_sentence_transformers.json"), transformer=transformer)
