"""Tiny random Hugging Face checkpoints (BERT, Llama, Qwen2) with real tokenizers, saved with
`save_pretrained`, so tests exercise the real loading path without any download."""
from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (BertConfig, BertModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

WORDS = ("the a an of and to in for on with bought searched clicked watched liked latte coffee shoes running "
         "movie toy story comedy drama action star wars book phone red blue big small new old film music").split()
FAMILIES = ("bert", "llama", "qwen2")


def _vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = [w for w in WORDS if len(w) > 1]
    return list(dict.fromkeys(specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + words))


def _save_tokenizer(folder: Path, family: str) -> int:
    """A WordPiece tokenizer over a small vocabulary; BERT's wraps texts in [CLS] ... [SEP]."""
    vocab = _vocab()
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = {"unk_token": "[UNK]", "pad_token": "[PAD]"}
    if family == "bert":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
        special.update(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        special.update(bos_token="<s>", eos_token="</s>")
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(folder)
    return len(vocab)


def make_tiny_checkpoint(folder: str | Path, family: str, *, num_layers: int = 4, hidden: int = 64,
                         seed: int = 0, as_causal_lm: bool = True) -> Path:
    """Save a random `family` model of `num_layers` layers with a working tokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _save_tokenizer(folder, family)
    torch.manual_seed(seed)
    if family == "bert":
        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
                            num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=128)
        model = BertModel(config)
    else:
        cls_config, cls_model = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        config = cls_config(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
                            max_position_embeddings=4096, pad_token_id=0, bos_token_id=5, eos_token_id=6)
        model = cls_model(config)
        if not as_causal_lm:
            model = model.model
    # Random init leaves norms at 1 and biases at 0; perturb every tensor so a misplaced one shows.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(folder)
    return folder
