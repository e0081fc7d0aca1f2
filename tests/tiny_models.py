"""Tiny random-weight checkpoints in the real file layouts, built in a test process for the adapter tests.

Each builder seeds torch, writes a model and its tokenizer into the given folder with `save_pretrained` (plus the
extra files the family's real checkpoints carry) and returns the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    BertPreTrainedModel,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from tests.sentences import SENTENCES

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
XLMR_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..3 as in XLM-RoBERTa
# Plain vocabulary entries, not special tokens, as in BERT's vocab.txt: colbert-ir uses them as query/doc markers.
BERT_PLAIN = ("[unused0]", "[unused1]")
EXTRA_TEXT = ["what is the capital of france", "paris is the capital and largest city of france",
              "berlin is in germany", "query document passage search retrieval"]
MAX_POSITIONS = 128
COLBERT_DIM = 16


def _trained_wordpiece(specials: tuple[str, ...], cls: str, sep: str, unk: str,
                       plain: tuple[str, ...] = ()) -> Tokenizer:
    trained = Tokenizer(models.WordPiece(unk_token=unk))
    trained.normalizer = normalizers.BertNormalizer(lowercase=True)
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=list(specials), show_progress=False)
    trained.train_from_iterator([*SENTENCES, *EXTRA_TEXT], trainer=trainer)
    # Rebuilt from the trained vocabulary so that `plain` entries are ordinary word pieces, never matched whole.
    vocab = trained.get_vocab()
    vocab.update({token: len(vocab) + i for i, token in enumerate(plain)})
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk))
    tok.normalizer = trained.normalizer
    tok.pre_tokenizer = trained.pre_tokenizer
    tok.add_special_tokens(list(specials))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return tok


def bert_tokenizer() -> PreTrainedTokenizerFast:
    tok = _trained_wordpiece(BERT_SPECIALS, "[CLS]", "[SEP]", "[UNK]", BERT_PLAIN)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_POSITIONS)


def xlmr_tokenizer() -> PreTrainedTokenizerFast:
    tok = _trained_wordpiece(XLMR_SPECIALS, "<s>", "</s>", "<unk>")
    # XLM-RoBERTa's tokenizer: <s> is both bos and cls, </s> both eos and sep.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   sep_token="</s>", pad_token="<pad>", cls_token="<s>", mask_token="<mask>",
                                   model_max_length=MAX_POSITIONS - 2)


def bert_config(vocab_size: int, positions: int = MAX_POSITIONS, **extra: Any) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=positions, **extra)


def _save(model: Any, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def build_mlm(folder: Path) -> Path:
    """A SPLADE-style checkpoint: `BertForMaskedLM` and its tokenizer, nothing else."""
    torch.manual_seed(0)
    tokenizer = bert_tokenizer()
    return _save(BertForMaskedLM(bert_config(len(tokenizer))).eval(), tokenizer, folder)


class HFColBERT(BertPreTrainedModel):
    """colbert-ir's `HF_ColBERT`: the encoder under `bert.` and a bias-free projection `linear` in one checkpoint."""

    def __init__(self, config: BertConfig, dim: int = COLBERT_DIM) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.linear = torch.nn.Linear(config.hidden_size, dim, bias=False)
        self.post_init()


def build_colbert_stanford(folder: Path) -> Path:
    """The colbert-ir layout: `HF_ColBERT` weights (`bert.*` + `linear.weight`) and `artifact.metadata`."""
    torch.manual_seed(0)
    tokenizer = bert_tokenizer()
    model = HFColBERT(bert_config(len(tokenizer), architectures=["HF_ColBERT"])).eval()
    _save(model, tokenizer, folder)
    _write_json(folder / "artifact.metadata", {"query_token_id": "[unused0]", "doc_token_id": "[unused1]",
                                                "query_maxlen": 8, "doc_maxlen": 64, "dim": COLBERT_DIM})
    return folder


def build_colbert_pylate(folder: Path) -> Path:
    """The sentence-transformers/PyLate layout: encoder at the root, `1_Dense/` projection, `[Q] `/`[D] ` tokens."""
    torch.manual_seed(0)
    tokenizer = bert_tokenizer()
    tokenizer.add_tokens(["[Q] ", "[D] "])  # as PyLate does, which grows the vocabulary by two
    _save(BertModel(bert_config(len(tokenizer))).eval(), tokenizer, folder)
    linear = torch.nn.Linear(32, COLBERT_DIM, bias=False)
    (folder / "1_Dense").mkdir()
    save_file({"linear.weight": linear.weight.detach().contiguous()}, str(folder / "1_Dense" / "model.safetensors"))
    _write_json(folder / "1_Dense" / "config.json", {"in_features": 32, "out_features": COLBERT_DIM, "bias": False,
                                                      "activation_function": "torch.nn.modules.linear.Identity"})
    _write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"}])
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": 64, "do_lower_case": False})
    _write_json(folder / "config_sentence_transformers.json", {
        "query_prefix": "[Q] ", "document_prefix": "[D] ", "query_length": 8, "document_length": 64})
    return folder


def build_bge_m3(folder: Path, colbert_dim: int | None = None) -> Path:
    """The BGE-M3 layout: an XLM-RoBERTa encoder plus `colbert_linear.pt` and `sparse_linear.pt` state dicts."""
    torch.manual_seed(0)
    tokenizer = xlmr_tokenizer()
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=MAX_POSITIONS, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2)
    _save(XLMRobertaModel(config).eval(), tokenizer, folder)
    torch.save(torch.nn.Linear(32, colbert_dim or 32).state_dict(), folder / "colbert_linear.pt")
    torch.save(torch.nn.Linear(32, 1).state_dict(), folder / "sparse_linear.pt")
    return folder


def build_cross_encoder(folder: Path) -> Path:
    """A reranker: `BertForSequenceClassification` with one label."""
    torch.manual_seed(0)
    tokenizer = bert_tokenizer()
    model = BertForSequenceClassification(bert_config(len(tokenizer), num_labels=1)).eval()
    return _save(model, tokenizer, folder)


def build_dense_st(folder: Path, positions: int = MAX_POSITIONS) -> Path:
    """A sentence-transformers dense model: `BertModel`, CLS pooling in `1_Pooling`, then `Normalize`."""
    torch.manual_seed(0)
    tokenizer = bert_tokenizer()
    _save(BertModel(bert_config(len(tokenizer), positions)).eval(), tokenizer, folder)
    _write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    _write_json(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": 32, "pooling_mode_cls_token": True,
                                                       "pooling_mode_mean_tokens": False})
    (folder / "2_Normalize").mkdir()
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": 64, "do_lower_case": False})
    return folder


def build_sparse_st(folder: Path) -> Path:
    """A sentence-transformers `SparseEncoder` SPLADE: `BertForMaskedLM` as `MLMTransformer`, then `SpladePooling`."""
    build_mlm(folder)
    _write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.sparse_encoder.models.MLMTransformer"},
        {"idx": 1, "name": "1", "path": "1_SpladePooling",
         "type": "sentence_transformers.sparse_encoder.models.SpladePooling"}])
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    _write_json(folder / "1_SpladePooling" / "config.json", {"pooling_strategy": "max", "activation_function": "relu",
                                                             "word_embedding_dimension": vocab})
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": False})
    return folder


def build_cross_encoder_like(folder: Path, tokenizer_dir: Path, layers: int = 2, hidden: int = 32,
                             labels: int = 1) -> Path:
    """A reranker of BERT's shape with a real BERT tokenizer (from `tokenizer_dir`: pairs with token types), random
    weights. `layers=6, hidden=384` is the shape of cross-encoder/ms-marco-MiniLM-L-6-v2."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 32), intermediate_size=4 * hidden,
                        max_position_embeddings=512, num_labels=labels)
    return _save(BertForSequenceClassification(config).eval(), tokenizer, folder)


def build_colbert_like(folder: Path, tokenizer_dir: Path, layers: int = 6, hidden: int = 384, dim: int = 128) -> Path:
    """A colbert-ir checkpoint of BERT's shape with a real BERT tokenizer (from `tokenizer_dir`), random weights, with
    colbertv2's lengths (32 query, 180 document tokens). `layers=6, hidden=384` is MiniLM-L6's shape."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 32), intermediate_size=4 * hidden,
                        max_position_embeddings=512, architectures=["HF_ColBERT"])
    _save(HFColBERT(config, dim).eval(), tokenizer, folder)
    _write_json(folder / "artifact.metadata", {"query_token_id": "[unused0]", "doc_token_id": "[unused1]",
                                                "query_maxlen": 32, "doc_maxlen": 180, "dim": dim})
    return folder
