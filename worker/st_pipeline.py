"""What a sentence-transformers dense checkpoint computes after its encoder, as typed steps (router and worker; stdlib
only): Pooling, Dense and Normalize in `modules.json` order, and its input module's maximum length and lower-casing;
or `Unsupported`, naming the module, mode, activation or key that we do not compute and what we do.

These are the steps `SentenceTransformer.encode` runs, in both on-disk layouts (`st_layout` reads them); the engines
compute them after the encoder's hidden states (`adapters/st_head.py`). Nothing is skipped or approximated: what is
not implemented here refuses the load, so a checkpoint never answers with plausible, wrong vectors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sie_worker.st_layout import Layout, Module, pooling_modes, read_json

log = logging.getLogger("sie.st")

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# Our earlier names for a pooling mode, still taken from model configs and requests.
POOLING_ALIASES = {"last": "lasttoken", "last_token": "lasttoken"}
# torch.nn activations a Dense module may name; sentence-transformers builds them with no arguments (their defaults).
ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU", "LeakyReLU", "ELU", "Softplus", "Mish",
               "Hardtanh", "ReLU6", "SELU", "Softsign")
# sentence-transformers' own default, and what it uses for an activation path outside torch without trust_remote_code.
DEFAULT_ACTIVATION = "Tanh"
STEP_MODULES = ("Pooling", "Dense", "Normalize", "Dropout")
SENTENCE_EMBEDDING = "sentence_embedding"
# Keys of the input module's `sentence_bert_config.json` and the values that leave the computation unchanged (None:
# any value; a tuple: the values allowed).
TRANSFORMER_KEYS: dict[str, tuple[Any, ...] | None] = {
    "max_seq_length": None, "do_lower_case": None, "backend": None, "cache_dir": None, "unpad_inputs": None,
    "transformer_task": ("feature-extraction",), "module_output_name": ("token_embeddings",),
    "modality_config": ({"text": {"method": "forward", "method_output_name": "last_hidden_state"}},),
    "processing_kwargs": ({},)}
# Keyword arguments the input module passes on, by argument group: what each may hold without changing the vectors
# (the dtype is the engine's precision; the attention implementation computes the same attention).
PASSED_KEYS = {"model_args": {"torch_dtype", "dtype", "attn_implementation", "trust_remote_code", "revision"},
               "tokenizer_args": {"trust_remote_code", "padding_side", "model_max_length", "revision"},
               "config_args": {"trust_remote_code", "revision"}}
PASSED_ALIASES = {"model_kwargs": "model_args", "processor_kwargs": "tokenizer_args", "config_kwargs": "config_args"}
POOLING_KEYS = {"embedding_dimension", "word_embedding_dimension", "pooling_mode", "include_prompt",
                "pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_tokens",
                "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"}
DENSE_KEYS = {"in_features", "out_features", "bias", "activation_function", "module_input_name", "module_output_name",
              "use_residual"}
NORMALIZE_KEYS = {"module_input_name", "module_output_name"}
# transformers' model_max_length when a tokenizer sets none: no limit.
UNLIMITED = 1 << 40


class Unsupported(ValueError):
    """The checkpoint asks for a computation the dense engines do not implement; the message names it."""


@dataclass(frozen=True)
class Pooling:
    """sentence-transformers' Pooling: one mode, or several concatenated in this order."""

    modes: tuple[str, ...]
    include_prompt: bool = True
    width: int | None = None  # the token embeddings' width (None: the encoder's hidden size)


@dataclass(frozen=True)
class Dense:
    """A Dense module: `activation(x @ W.T + b)`, plus `x` (or a bias-free projection of it) when `residual`."""

    folder: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a name in ACTIVATIONS
    residual: bool = False


@dataclass(frozen=True)
class Normalize:
    """L2 normalisation of the sentence embedding."""


Step = Dense | Normalize


@dataclass(frozen=True)
class Pipeline:
    """The steps after the encoder, and how its input module tokenizes."""

    pooling: Pooling
    steps: tuple[Step, ...] = ()
    do_lower_case: bool = False
    max_seq_length: int | None = None  # sentence-transformers' maximum length in tokens (None: not limited)

    @property
    def normalize(self) -> bool:
        return any(isinstance(step, Normalize) for step in self.steps)

    def dim(self, hidden_size: int) -> int:
        """The width of the sentence embedding for an encoder of this hidden size."""
        dense = [step for step in self.steps if isinstance(step, Dense)]
        return dense[-1].out_features if dense else len(self.pooling.modes) * (self.pooling.width or hidden_size)

    def with_pooling(self, modes: tuple[str, ...]) -> Pipeline:
        """The pipeline pooling with `modes` instead (a model config's or a request's `pooling`)."""
        if modes == self.pooling.modes:
            return self
        first = next((step for step in self.steps if isinstance(step, Dense)), None)
        width = self.pooling.width
        if first is not None and width is not None and first.in_features != len(modes) * width:
            raise Unsupported(f"pooling {'+'.join(modes)} gives {len(modes) * width} values, but the checkpoint's "
                              f"Dense module ({first.folder.name}) takes {first.in_features}")
        return replace(self, pooling=replace(self.pooling, modes=modes))

    def with_normalize(self, normalize: bool) -> Pipeline:
        """The pipeline with its Normalize steps dropped, or one added last (a config's or request's `normalize`)."""
        if normalize == self.normalize:
            return self
        if normalize:
            return replace(self, steps=(*self.steps, Normalize()))
        return replace(self, steps=tuple(step for step in self.steps if not isinstance(step, Normalize)))


def pooling_mode(name: str) -> str:
    """A pooling mode under sentence-transformers' name; Unsupported for a mode we do not compute."""
    mode = POOLING_ALIASES.get(name, name)
    if mode not in POOLING_MODES:
        raise Unsupported(f"pooling mode {name!r} is not computed; the dense engines compute "
                          f"{', '.join(POOLING_MODES)} (and concatenations of them)")
    return mode


def custom_code(folder: Path) -> str | None:
    """What custom code the encoder in `folder` names in its `config.json` (`auto_map`), or None."""
    config = read_json(folder / "config.json")
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map:
        return None
    # A value is a class path, or a [slow, fast] pair of tokenizer class paths, either of which may be None.
    names = {str(n) for v in dict(auto_map).values() for n in ([v] if isinstance(v, str) else v or []) if n}
    return ", ".join(sorted(names)) or "auto_map"


def read_pipeline(layout: Layout, *, trust_remote_code: bool = False) -> Pipeline:
    """The steps of the dense checkpoint `layout` describes; a folder without `modules.json` pools by mean, as
    sentence-transformers does for a bare encoder. Unsupported names what cannot be computed."""
    if not layout.modules:
        return Pipeline(pooling=Pooling(("mean",)), max_seq_length=max_length(layout))
    first, *rest = layout.modules
    if first.kind != "Transformer":
        raise Unsupported(f"the first module is {first.type}; a dense checkpoint starts with a Transformer")
    transformer = _transformer(layout, first)
    if not rest or rest[0].kind != "Pooling":
        raise Unsupported("the Transformer is not followed by a Pooling module; the dense engines pool token "
                          "embeddings into one vector with Pooling")
    pooling = _pooling(rest[0])
    steps = tuple(step for module in rest[1:] if (step := _step(module, trust_remote_code)) is not None)
    return Pipeline(pooling=pooling, steps=steps, do_lower_case=bool(transformer.get("do_lower_case")),
                    max_seq_length=max_length(layout))


def max_length(layout: Layout) -> int | None:
    """sentence-transformers' maximum length: `max_seq_length` of the input module's config, else the tokenizer's
    `model_max_length` capped at the encoder's `max_position_embeddings`; None when neither limits it."""
    if layout.max_seq_length:
        return layout.max_seq_length
    passed = _passed(layout.transformer, "tokenizer_args").get("model_max_length")
    if passed:
        return int(passed)
    folder = layout.encoder_folder
    tokenizer = read_json(folder / "tokenizer_config.json")
    config = read_json(folder / "config.json")
    limit = int((tokenizer if isinstance(tokenizer, dict) else {}).get("model_max_length") or UNLIMITED)
    positions = (config if isinstance(config, dict) else {}).get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        limit = min(limit, positions)
    return None if limit >= UNLIMITED else limit


def _named(module: Module) -> str:
    return f"{module.type} ({module.folder.name or 'the root'})"


def _check_keys(module: Module, config: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(config) - known)
    if unknown:
        raise Unsupported(f"{_named(module)} sets {unknown}, which the dense engines do not implement; they read "
                          f"{sorted(known)}")


def _passed(transformer: dict[str, Any], group: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in transformer.items():
        if PASSED_ALIASES.get(key, key) == group and isinstance(value, dict):
            found.update(value)
    return found


def _transformer(layout: Layout, module: Module) -> dict[str, Any]:
    if not module.type.startswith("sentence_transformers."):
        raise Unsupported(f"{_named(module)} is custom code; the dense engines run sentence-transformers' "
                          "Transformer")
    config = layout.transformer
    for key, value in config.items():
        group = PASSED_ALIASES.get(key, key)
        if group in PASSED_KEYS:
            unknown = sorted(set(value or {}) - PASSED_KEYS[group])
            if unknown:
                raise Unsupported(f"the Transformer's sentence_bert_config.json passes {key} {unknown}, which change "
                                  f"the vectors and are not implemented; {key} may hold {sorted(PASSED_KEYS[group])}")
        elif key not in TRANSFORMER_KEYS:
            raise Unsupported(f"the Transformer's sentence_bert_config.json sets {key!r}, which the dense engines do "
                              f"not implement; they read {sorted([*TRANSFORMER_KEYS, *PASSED_KEYS])}")
        elif (allowed := TRANSFORMER_KEYS[key]) is not None and value not in allowed:
            raise Unsupported(f"the Transformer's sentence_bert_config.json sets {key}={value!r}; the dense engines "
                              f"compute {key}={allowed[0]!r}")
    return config


def _pooling(module: Module) -> Pooling:
    config = module.config
    _check_keys(module, config, POOLING_KEYS)
    modes = tuple(pooling_mode(mode) for mode in pooling_modes(config))
    width = config.get("embedding_dimension") or config.get("word_embedding_dimension")
    return Pooling(modes=modes, include_prompt=config.get("include_prompt", True) is not False,
                   width=int(width) if width else None)


def _step(module: Module, trust_remote_code: bool) -> Step | None:
    if not module.type.startswith("sentence_transformers.") or module.kind not in STEP_MODULES:
        raise Unsupported(f"{_named(module)} is not computed; after the Transformer and its Pooling the dense "
                          f"engines compute {', '.join(m for m in STEP_MODULES if m != 'Pooling')} modules")
    config = module.config
    if module.kind == "Dropout":
        return None  # the identity at inference
    if module.kind == "Normalize":
        _check_keys(module, config, NORMALIZE_KEYS)
        _check_io(module, config)
        return Normalize()
    if module.kind == "Pooling":
        raise Unsupported(f"{_named(module)} is a second Pooling module; the dense engines pool once")
    _check_keys(module, config, DENSE_KEYS)
    _check_io(module, config)
    if not isinstance(config.get("in_features"), int) or not isinstance(config.get("out_features"), int):
        raise Unsupported(f"{_named(module)} has no in_features and out_features in its config.json")
    return Dense(folder=module.folder, in_features=int(config["in_features"]),
                 out_features=int(config["out_features"]), bias=config.get("bias", True) is not False,
                 activation=_activation(module, config.get("activation_function"), trust_remote_code),
                 residual=bool(config.get("use_residual", False)))


def _check_io(module: Module, config: dict[str, Any]) -> None:
    for key in ("module_input_name", "module_output_name"):
        if config.get(key) not in (None, SENTENCE_EMBEDDING):
            raise Unsupported(f"{_named(module)} sets {key}={config[key]!r}; the dense engines compute modules "
                              f"on {SENTENCE_EMBEDDING!r}")


def _activation(module: Module, path: Any, trust_remote_code: bool) -> str:
    """The activation as sentence-transformers loads it: a torch.nn class by its path; a path outside torch is Tanh
    unless remote code is trusted (then it is custom code, which we do not run)."""
    if path is None:
        return DEFAULT_ACTIVATION
    path = str(path)
    if not path.startswith("torch."):
        if trust_remote_code:
            raise Unsupported(f"{_named(module)} names the custom activation {path!r}; the dense engines compute "
                              f"torch.nn's {', '.join(ACTIVATIONS)}")
        log.warning("%s names the activation %r outside torch: Tanh, as sentence-transformers loads it without "
                    "trust_remote_code", _named(module), path)
        return DEFAULT_ACTIVATION
    name = path.rsplit(".", 1)[-1]
    if name not in ACTIVATIONS:
        raise Unsupported(f"{_named(module)} applies {path}, which the dense engines do not compute; they compute "
                          f"torch.nn's {', '.join(ACTIVATIONS)}")
    return name
