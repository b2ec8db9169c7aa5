"""A Hugging Face checkpoint in a local folder: config, tokenizer and safetensors weights, read
lazily tensor by tensor. Pickled weights (*.bin, *.pt) are refused: loading them runs code.

The small files (config.json and the tokenizer's files) are read once, when the checkpoint is opened:
the fingerprint and `save_small_files` use those bytes, so a folder replaced on disk later (a scorer
saved over the one this came from) cannot slip another model's tokenizer in. The weight files stay
open (memory-mapped) from the start too."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from weights.atomic import atomic_write

SUPPORTED_FAMILIES = ("bert", "llama", "qwen2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Prefixes under which task heads nest the base model's tensors (BertForMaskedLM, LlamaForCausalLM, ...).
BASE_PREFIXES = ("", "model.", "bert.")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model")
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")  # one is needed
SMALL_FILES = ("config.json", *TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json")
# Tensors of numbered layers: BERT "encoder.layer.<i>.", Llama/Qwen2 "layers.<i>." (under a task-head prefix).
LAYER_TENSOR = re.compile(r"^(?:model\.|bert\.)?(?:encoder\.layer|layers)\.(\d+)\.")
# Config fields that change what the layers compute; they enter the fingerprint.
FINGERPRINT_CONFIG = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "hidden_act", "layer_norm_eps", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
                      "type_vocab_size", "intermediate_size")


class CheckpointError(ValueError):
    """The folder is not a usable checkpoint: missing files, pickled weights, unsupported family."""


class Checkpoint:
    """Config, tokenizer and lazily read tensors of a local Hugging Face model folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist")
        if not (self.folder / "config.json").is_file():
            raise CheckpointError(f"{self.folder}: missing config.json")
        if not any((self.folder / name).is_file() for name in VOCABULARY_FILES):
            raise CheckpointError(f"{self.folder}: cannot load the tokenizer: no vocabulary file (none of "
                                  f"{', '.join(VOCABULARY_FILES)}), every word would be unknown")
        self.small_files = {name: (self.folder / name).read_bytes() for name in SMALL_FILES
                            if (self.folder / name).is_file()}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickled:
                raise CheckpointError(f"{self.folder}: only pickled weights {pickled} found; pickled checkpoints are "
                                      "refused (they can run code on load). Convert them to safetensors.")
            raise CheckpointError(f"{self.folder}: no *.safetensors weight files")
        try:
            self.config: PretrainedConfig = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - bad JSON, field validation, unknown class: all one answer
            raise CheckpointError(f"{self.folder}: cannot read config.json ({type(err).__name__}: {err})") from None
        self.family = self.config.model_type
        if self.family not in SUPPORTED_FAMILIES:
            raise CheckpointError(f"{self.folder}: model_type {self.family!r} is not supported; supported families: "
                                  f"{', '.join(SUPPORTED_FAMILIES)}")
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
            self._handles[path] = handle
            for name in handle.keys():
                self._file_of[name] = path
        self._check_layer_count()
        self.tokenizer = self._load_tokenizer()

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def resolve(self, name: str) -> str | None:
        """The stored name of base-model tensor `name` (task-head prefixes and old LayerNorm
        gamma/beta names allowed), or None when absent."""
        candidates = [name]
        if name.endswith("LayerNorm.weight"):
            candidates.append(name[:-len("weight")] + "gamma")
        if name.endswith("LayerNorm.bias"):
            candidates.append(name[:-len("bias")] + "beta")
        for prefix in BASE_PREFIXES:
            for candidate in candidates:
                if prefix + candidate in self._file_of:
                    return prefix + candidate
        return None

    def has(self, name: str) -> bool:
        return self.resolve(name) is not None

    def tensor(self, name: str) -> torch.Tensor:
        """Base-model tensor `name`, read from disk as stored."""
        stored = self.resolve(name)
        if stored is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        return self._handles[self._file_of[stored]].get_tensor(stored)

    def _check_layer_count(self) -> None:
        """CheckpointError when the weights hold layers past config.json's num_hidden_layers: they would be
        ignored without a word. Fewer is allowed (a scorer's backbone/ keeps only its lower layers); a layer
        the split needs and the weights lack is named when it is loaded."""
        layers = getattr(self.config, "num_hidden_layers", None)
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
            raise CheckpointError(f"{self.folder}: config.json num_hidden_layers must be an int >= 0, got {layers!r}")
        found = [int(m.group(1)) for m in map(LAYER_TENSOR.match, self._file_of) if m]
        if found and max(found) >= layers:
            raise CheckpointError(f"{self.folder}: the weights hold {max(found) + 1} layers (layer {max(found)} "
                                  f"is there), config.json names {layers} (num_hidden_layers): not this "
                                  "checkpoint's config")

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The folder's tokenizer; CheckpointError when it does not load or does not fit the model."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            size, specials = len(tokenizer), len(set(tokenizer.all_special_ids))
        except Exception as err:  # noqa: BLE001 - hostile files raise anything (RecursionError, ...): one answer
            raise CheckpointError(f"{self.folder}: cannot load the tokenizer ({type(err).__name__}: {err})") from None
        vocab_size = getattr(self.config, "vocab_size", None)
        if isinstance(vocab_size, int) and size > vocab_size:
            raise CheckpointError(f"{self.folder}: the tokenizer has {size} tokens, more than the model's vocab_size "
                                  f"{vocab_size}: not this model's tokenizer")
        if size <= specials:
            raise CheckpointError(f"{self.folder}: the tokenizer holds only its {specials} special tokens, no vocabulary")
        return tokenizer

    def save_small_files(self, folder: Path) -> None:
        """Write config.json and the tokenizer files, as read at open, into `folder` (each atomically)."""
        for name, raw in self.small_files.items():
            with atomic_write(folder / name) as handle:
                handle.write(raw)

    def fingerprint(self, tensor_names: list[str]) -> str:
        """BLAKE2b of the computing config fields, the tokenizer files and the given tensors' bytes:
        equal exactly when two checkpoints compute the same thing with those tensors."""
        digest = hashlib.blake2b(digest_size=16)
        fields = {k: getattr(self.config, k, None) for k in FINGERPRINT_CONFIG}
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
        for name in SMALL_FILES:
            if name in TOKENIZER_FILES and name in self.small_files:
                digest.update(name.encode() + self.small_files[name])
        for name in sorted(tensor_names):
            tensor = self.tensor(name).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            raw = tensor.view(torch.uint8) if tensor.dim() else tensor.reshape(1).view(torch.uint8)
            digest.update(raw.numpy().tobytes())
        return digest.hexdigest()
