"""Tiny random-weight sentence-transformers encoders, one backbone per architecture a user brings (test process).

`build_backbone(arch, folder)` writes a seeded Hugging Face model (hidden 32, 2 layers) and a tokenizer shaped like the
architecture's own: its special tokens, the EOS a decoder's tokenizer appends, its padding side. `build_case(case,
root)` saves a `SentenceTransformer` over that backbone (Pooling, any number of Dense, Normalize, prompts) with the
installed sentence-transformers, in the layout it writes or rewritten into the classic one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModel,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    LlamaConfig,
    MistralConfig,
    ModernBertConfig,
    MPNetConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
    T5Config,
    T5EncoderModel,
    XLMRobertaConfig,
)

from tests.sentences import SENTENCES

HIDDEN = 32
POSITIONS = 128
WORDS = ["what is the capital of france", "paris is the capital and largest city of france", "query: passage: "]


@dataclass(frozen=True)
class Shape:
    """How an architecture's tokenizer frames a text: its specials, template, padding side and input names."""

    specials: tuple[str, ...]  # in id order from 0
    template: str  # TemplateProcessing's `single`
    roles: dict[str, str]  # transformers' special-token names -> tokens
    padding_side: str = "right"
    token_types: bool = True
    lowercase: bool = True  # the tokenizer lowercases by itself (BERT uncased); False: cased


BERT = Shape(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), "[CLS] $A [SEP]",
             {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
              "mask_token": "[MASK]"})
BERT_CASED = Shape(BERT.specials, BERT.template, BERT.roles, lowercase=False)
BERT_NO_TYPES = Shape(BERT.specials, BERT.template, BERT.roles, token_types=False)  # DistilBERT, ModernBERT
ROBERTA = Shape(("<s>", "<pad>", "</s>", "<unk>", "<mask>"), "<s> $A </s>",
                {"bos_token": "<s>", "cls_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>",
                 "sep_token": "</s>", "unk_token": "<unk>", "mask_token": "<mask>"}, token_types=False)
T5 = Shape(("<pad>", "</s>", "<unk>"), "$A </s>", {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
           token_types=False)
# Qwen3-Embedding: no BOS, <|endoftext|> appended and used as padding, on the left.
QWEN = Shape(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "$A <|endoftext|>",
             {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
             padding_side="left", token_types=False)
# e5-mistral and Llama-based embedders: <s> before, </s> appended, padded with </s> on the right.
LLAMA = Shape(("<unk>", "<s>", "</s>"), "<s> $A </s>",
              {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
              token_types=False)


def _small(**extra: Any) -> dict[str, Any]:
    return {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": POSITIONS, **extra}


def _decoder(**extra: Any) -> dict[str, Any]:
    return _small(num_key_value_heads=1, head_dim=16, tie_word_embeddings=False, **extra)


# architecture -> (tokenizer shape, config class, config kwargs given the vocabulary and the tokenizer's ids)
ARCHITECTURES: dict[str, tuple[Shape, Any, Any]] = {
    "bert": (BERT, BertConfig, lambda ids: _small()),
    "bert-cased": (BERT_CASED, BertConfig, lambda ids: _small()),
    "roberta": (ROBERTA, RobertaConfig, lambda ids: _small(max_position_embeddings=POSITIONS + 2, pad_token_id=1)),
    "xlm-roberta": (ROBERTA, XLMRobertaConfig,
                    lambda ids: _small(max_position_embeddings=POSITIONS + 2, pad_token_id=1)),
    "mpnet": (ROBERTA, MPNetConfig, lambda ids: _small(max_position_embeddings=POSITIONS + 2, pad_token_id=1)),
    "distilbert": (BERT_NO_TYPES, DistilBertConfig,
                   lambda ids: {"dim": HIDDEN, "n_layers": 2, "n_heads": 2, "hidden_dim": 64,
                                "max_position_embeddings": POSITIONS}),
    "deberta-v2": (BERT, DebertaV2Config,
                   lambda ids: _small(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
                                      norm_rel_ebd="layer_norm", max_relative_positions=-1,
                                      position_biased_input=False)),
    "electra": (BERT, ElectraConfig, lambda ids: _small(embedding_size=16)),
    "modernbert": (BERT_NO_TYPES, ModernBertConfig,
                   lambda ids: _small(global_attn_every_n_layers=2, local_attention=16, pad_token_id=ids["[PAD]"],
                                      cls_token_id=ids["[CLS]"], sep_token_id=ids["[SEP]"],
                                      bos_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"])),
    "t5": (T5, T5Config, lambda ids: {"d_model": HIDDEN, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2,
                                      "relative_attention_num_buckets": 8, "pad_token_id": 0, "eos_token_id": 1,
                                      "decoder_start_token_id": 0}),
    "qwen2": (QWEN, Qwen2Config, lambda ids: _decoder(pad_token_id=0, eos_token_id=0)),
    "qwen3": (QWEN, Qwen3Config, lambda ids: _decoder(pad_token_id=0, eos_token_id=0)),
    "mistral": (LLAMA, MistralConfig, lambda ids: _decoder(bos_token_id=1, eos_token_id=2, pad_token_id=2)),
    "llama": (LLAMA, LlamaConfig, lambda ids: _decoder(bos_token_id=1, eos_token_id=2, pad_token_id=2)),
}


def word_piece_vocab(texts: list[str], specials: list[str], lowercase: bool, size: int = 300) -> dict[str, int]:
    """The same vocabulary on every run, unlike the tokenizers trainer's (its ties fall in hash order, so each build
    had other tokens, and bf16 tests saw other vectors from run to run): the special tokens, every character alone and
    as a continuation, then the commonest words, ties in alphabetical order."""
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: dict[str, int] = {}
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    characters = sorted({character for word in counts for character in word})
    tokens = [*specials, *characters, *(f"##{character}" for character in characters)]
    words = sorted((word for word in counts if len(word) > 1), key=lambda word: (-counts[word], word))
    tokens += words[:max(0, size - len(tokens))]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def tokenizer_for(shape: Shape) -> PreTrainedTokenizerFast:
    """A word-piece tokenizer over the test sentences' vocabulary, framed as `shape` says."""
    vocab = word_piece_vocab([*SENTENCES, *WORDS], list(shape.specials), shape.lowercase)
    trained = Tokenizer(models.WordPiece(vocab, unk_token=shape.roles["unk_token"]))
    trained.normalizer = normalizers.BertNormalizer(lowercase=shape.lowercase)
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = [token for token in shape.specials if token in shape.template]
    trained.post_processor = processors.TemplateProcessing(
        single=shape.template, special_tokens=[(token, trained.token_to_id(token)) for token in specials])
    names = ["input_ids", *(["token_type_ids"] if shape.token_types else []), "attention_mask"]
    return PreTrainedTokenizerFast(tokenizer_object=trained, model_max_length=POSITIONS,
                                   padding_side=shape.padding_side, model_input_names=names, **shape.roles)


def build_backbone(arch: str, folder: Path) -> Path:
    """The architecture's model (seeded, float32) and tokenizer in `folder`."""
    shape, config_class, kwargs = ARCHITECTURES[arch]
    tokenizer = tokenizer_for(shape)
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), **kwargs(tokenizer.get_vocab()))
    model = (T5EncoderModel(config) if arch == "t5" else AutoModel.from_config(config)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


Pooling = str | tuple[str, ...]
TANH, IDENTITY, GELU = ("torch.nn.modules.activation.Tanh", "torch.nn.modules.linear.Identity",
                        "torch.nn.modules.activation.GELU")


@dataclass(frozen=True)
class Case:
    """One checkpoint of the matrix: a backbone and the modules after it."""

    name: str
    arch: str = "bert"
    pooling: Pooling = "mean"
    include_prompt: bool = True
    dense: tuple[tuple[int, str], ...] = ()  # (out_features, activation class path) per Dense module, in order
    normalize: bool = True
    layout: Literal["st6", "classic"] = "st6"
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    max_seq_length: int | None = 48  # short, so that some test texts are truncated
    dense_bin: bool = False  # the classic Dense weights as pytorch_model.bin, as sentence-transformers < 2.3 saved
    do_lower_case: bool = False  # the classic layout's sentence_bert_config.json key


def build_case(case: Case, root: Path) -> Path:
    """`root/case.name`: the case saved by sentence-transformers (backbones shared under `root/backbones`)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling as StPooling
    from sentence_transformers.util import import_from_string

    backbone = root / "backbones" / case.arch
    if not (backbone / "config.json").is_file():
        build_backbone(case.arch, backbone)
    transformer = Transformer(str(backbone))
    if case.max_seq_length is not None:
        transformer.max_seq_length = case.max_seq_length
    width = transformer.get_embedding_dimension()
    modes = case.pooling if isinstance(case.pooling, tuple) else (case.pooling,)
    modules: list[Any] = [transformer, StPooling(width, pooling_mode=case.pooling, include_prompt=case.include_prompt)]
    width *= len(modes)
    torch.manual_seed(1)
    for out_features, activation in case.dense:
        modules.append(Dense(width, out_features, activation_function=import_from_string(activation)()))
        width = out_features
    if case.normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu", prompts=case.prompts or None,
                                default_prompt_name=case.default_prompt_name)
    folder = root / case.name
    if folder.exists():
        shutil.rmtree(folder)
    model.save(str(folder))
    if case.layout == "classic":
        to_classic(folder, case)
    return folder


CLASSIC_FLAGS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
                 "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                 "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2))


def to_classic(folder: Path, case: Case) -> None:
    """Rewrite a sentence-transformers 6 save into the classic layout: `sentence_transformers.models.*` types, one
    boolean per pooling mode, `max_seq_length` in `sentence_bert_config.json`, Dense configs without the 5/6 keys."""
    entries = _json(folder / "modules.json")
    for entry in entries:
        kind = entry["type"].rsplit(".", 1)[-1]
        entry["type"] = f"sentence_transformers.models.{kind}"
        module = folder / entry["path"]
        if kind == "Pooling":
            config = _json(module / "config.json")
            modes = config["pooling_mode"] if isinstance(config["pooling_mode"], list) else [config["pooling_mode"]]
            classic = {"word_embedding_dimension": config["embedding_dimension"],
                       **{flag: mode in modes for mode, flag in CLASSIC_FLAGS.items()}}
            if not config["include_prompt"]:
                classic["include_prompt"] = False
            _write(module / "config.json", classic)
        elif kind == "Dense":
            config = _json(module / "config.json")
            _write(module / "config.json", {k: config[k] for k in ("in_features", "out_features", "bias",
                                                                    "activation_function")})
            if case.dense_bin:
                from safetensors.torch import load_file

                torch.save(load_file(str(module / "model.safetensors")), module / "pytorch_model.bin")
                (module / "model.safetensors").unlink()
        elif kind == "Normalize":
            (module / "config.json").unlink(missing_ok=True)
    _write(folder / "modules.json", entries)
    _write(folder / "sentence_bert_config.json", {"max_seq_length": case.max_seq_length or POSITIONS,
                                                  "do_lower_case": case.do_lower_case})


CUSTOM_CODE = """from transformers import BertModel


class ShiftedBert(BertModel):
    \"\"\"BERT with its hidden states shifted: a checkpoint's own code, which the stock class would not run.\"\"\"

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.last_hidden_state = out.last_hidden_state * 2 + 1
        return out
"""


def build_custom_code(folder: Path) -> Path:
    """A BERT checkpoint whose config names its own model class (`auto_map`), as NomicBERT or jina do."""
    build_case(Case(name=folder.name), folder.parent)
    (folder / "modeling_shifted.py").write_text(CUSTOM_CODE)
    config = _json(folder / "config.json")
    _write(folder / "config.json", {**config, "auto_map": {"AutoModel": "modeling_shifted.ShiftedBert"}})
    return folder
