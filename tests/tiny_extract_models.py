"""Tiny random-weight checkpoints for the extraction and CLIP adapter tests (test process only).

Each builder seeds torch, saves a model with its tokenizer or processor into the given dir and returns that dir, so the
adapters load it through the same `from_pretrained` path a real checkpoint takes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

SENTENCES = [
    "Alice lives in Paris and works for Acme Corporation.",
    "Bob moved from Berlin to London last year.",
    "The weather is great today, I love sunny days.",
    "This movie was terrible and boring.",
    "Sports, politics, technology and science are popular topics.",
    "This example is about travel.",
    "a photo of a cat", "a photo of a dog", "a red square on a blue background",
]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
NLI_LABELS = ["entailment", "neutral", "contradiction"]


def _bert_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)


def _bert_config(**kwargs):  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    # Ten times BERT's initializer_range: random heads then give well-separated scores, so that comparisons to 1e-5
    # and orderings are meaningful rather than all labels tying near a uniform distribution.
    return BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, initializer_range=0.2, **kwargs)


def _labelled(labels: list[str]) -> dict[str, object]:
    return {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}


def _save_classifier(folder: Path, labels: list[str], **config: object) -> Path:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_config(num_labels=len(labels), **_labelled(labels), **config))
    model.save_pretrained(folder)
    _bert_tokenizer().save_pretrained(folder)
    return folder


def build_sentiment(folder: Path) -> Path:
    """A two-label single-label classifier (softmax)."""
    return _save_classifier(folder, ["NEGATIVE", "POSITIVE"])


def build_multilabel(folder: Path) -> Path:
    """A three-label multi-label classifier (sigmoid)."""
    return _save_classifier(folder, ["joy", "anger", "fear"], problem_type="multi_label_classification")


def build_nli(folder: Path) -> Path:
    """An NLI head with entailment first, so the contradiction logit is the last one."""
    return _save_classifier(folder, NLI_LABELS)


def build_ner(folder: Path) -> Path:
    """A BIO token classifier."""
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    model = BertForTokenClassification(_bert_config(num_labels=len(NER_LABELS), **_labelled(NER_LABELS)))
    model.save_pretrained(folder)
    _bert_tokenizer().save_pretrained(folder)
    return folder


def build_bert(folder: Path) -> Path:
    """A bare BertModel with its tokenizer (GLiNER's backbone)."""
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(_bert_config()).save_pretrained(folder)
    _bert_tokenizer().save_pretrained(folder)
    return folder


def build_gliner(folder: Path, backbone: Path) -> Path:
    """A GLiNER span model over the tiny Bert in `backbone`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # gliner imports the deprecated torch.jit.script
        from gliner import GLiNER, GLiNERConfig

    torch.manual_seed(0)
    config = GLiNERConfig(model_name=str(backbone), hidden_size=32, max_width=4, max_len=64)
    model = GLiNER.from_config(config, backbone_from_pretrained=True)
    with torch.no_grad():
        # Freshly initialised heads score every span near 0.5; doubling them spreads scores over 0.2-0.9, so the
        # default threshold of 0.5 keeps some spans and drops others.
        for name, param in model.named_parameters():
            if "token_rep_layer" not in name:
                param.mul_(2.0)
    model.save_pretrained(folder)
    return folder


def _clip_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77)


def build_clip(folder: Path, projection_dim: int = 16) -> Path:
    """A CLIPModel with 32-d two-layer towers, 32 px images in 8 px patches and a 16-d joint space (or wider: a 16-d
    unit vector puts bf16's rounding into few elements, four times larger each than a 256-d one's)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder
