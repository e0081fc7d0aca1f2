"""The settings every dense engine resolves (worker process, free of torch): the steps after the encoder, the maximum
length and the prompts, from the model config's options over what the checkpoint's sentence-transformers files
declare (`sie_worker.st_pipeline`), and a batch's options over both.

A model config or a request may pick another pooling mode or turn normalisation on or off; what no engine computes is
refused (Unsupported at load, BadInput for a batch), never replaced by something close.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sie_worker.adapters.base import BadInput, BadModelConfig
from sie_worker.options import DenseOptions
from sie_worker.protocol import WorkerSpec
from sie_worker.st_layout import Layout, read_layout
from sie_worker.st_pipeline import Pipeline, Unsupported, custom_code, pooling_mode, read_pipeline


@dataclass(frozen=True)
class DenseSettings:
    """A dense encoder's steps, maximum length (None: not limited by its files) and prompts."""

    pipeline: Pipeline
    max_length: int | None
    prompts: dict[str, str]
    configured: str | None  # the model config's prompt (its `prompt`, or the text of its `prompt_name`), if any
    default: str  # the checkpoint's `default_prompt_name` prompt, else none
    custom_code: str | None  # what the encoder's `auto_map` names; it loads only with trust_remote_code

    def batch_pipeline(self, options: dict[str, Any]) -> Pipeline:
        """The pipeline under a batch's `pooling` and `normalize` options."""
        pipeline = self.pipeline
        try:
            if options.get("pooling") is not None:
                pipeline = pipeline.with_pooling(_modes(options["pooling"]))
        except Unsupported as exc:
            raise BadInput(f"options.pooling: {exc}") from None
        if options.get("normalize") is not None:
            pipeline = pipeline.with_normalize(bool(options["normalize"]))
        return pipeline

    def batch_prompt(self, options: dict[str, Any], is_query: bool = False) -> str:
        """The prompt a batch puts before its texts, as `SentenceTransformer.encode` (or `encode_query` for a query)
        picks it: the batch's `prompt` (a text, "" for none), else its `prompt_name`, else the model config's, else
        the checkpoint's `query` prompt for a query, else the checkpoint's default."""
        if options.get("prompt") is not None:
            if not isinstance(options["prompt"], str):
                raise BadInput("options.prompt must be a string")
            return str(options["prompt"])
        name = options.get("prompt_name")
        if name is not None:
            if name not in self.prompts:
                raise BadInput(f"options.prompt_name {name!r} is not one of this model's prompts: "
                               f"{sorted(self.prompts)}")
            return self.prompts[name]
        if self.configured is not None:
            return self.configured
        if is_query and "query" in self.prompts:
            return self.prompts["query"]
        return self.default


def _modes(pooling: Any) -> tuple[str, ...]:
    names = pooling if isinstance(pooling, (list, tuple)) else [pooling]
    if not names or not all(isinstance(name, str) for name in names):
        raise Unsupported(f"pooling must be a mode name or a list of them, not {pooling!r}")
    return tuple(pooling_mode(str(name)) for name in names)


def _named_prompt(layout: Layout, name: str | None, whose: str) -> str | None:
    if name is None:
        return None
    if name not in layout.prompts:
        raise BadModelConfig(f"{whose} {name!r} is not one of the checkpoint's prompts: {sorted(layout.prompts)}")
    return layout.prompts[name]


def dense_settings(spec: WorkerSpec) -> DenseSettings:
    """The model config's options over the checkpoint's sentence-transformers files, as every dense engine resolves
    them; Unsupported (a ValueError: the load fails as a config error) names what cannot be computed."""
    layout = read_layout(Path(spec.weights_dir))
    options = spec.options_as(DenseOptions)
    pipeline = read_pipeline(layout, trust_remote_code=spec.trust_remote_code)
    if options.pooling is not None:
        pipeline = pipeline.with_pooling(_modes(options.pooling))
    if options.normalize is not None:
        pipeline = pipeline.with_normalize(options.normalize)
    return DenseSettings(pipeline=pipeline, max_length=spec.max_sequence_length or pipeline.max_seq_length,
                         prompts=layout.prompts,
                         configured=options.prompt if options.prompt is not None else _named_prompt(
                             layout, options.prompt_name, "the model config's prompt_name"),
                         default=_named_prompt(layout, layout.default_prompt_name,
                                               "the checkpoint's default_prompt_name") or "",
                         custom_code=custom_code(layout.encoder_folder))
