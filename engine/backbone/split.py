"""Split a checkpoint into a frozen `LowerEncoder` (token embeddings + first L layers: tokens ->
token states, used offline by ABE) and a trainable `UpperEncoder` (remaining layers + final norm:
behavior embeddings -> contextual behavior states, used online by BA).

`forward_packed(x, offsets, max_len)` takes the longest sequence as a host int (known where the
batch is packed, on the host) and reads no device value; the padded `forward`s are boundaries that
compute it from their masks."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from kernels._jagged import check_max_len, offsets_from_lengths, pad, positions_in_sequence
from weights.atomic import atomic_write
from weights.checkpoint import Checkpoint, CheckpointError
from engine.backbone.layers import (LEGACY_FUSED_NAMES, BertEmbeddings, BertLayer, DecoderEmbeddings, DecoderLayer,
                                    RMSNorm, RotaryTable)
from weights.safetensors_io import source_of, write_safetensors


@dataclass(frozen=True)
class Family:
    """How one model family maps onto our packed layers."""
    layer: type[nn.Module]
    embeddings: type[nn.Module]
    layer_prefix: str
    final_norm: str | None
    rotary: type[nn.Module] | None


FAMILIES = {
    "bert": Family(BertLayer, BertEmbeddings, "encoder.layer.{}.", None, None),
    "llama": Family(DecoderLayer, DecoderEmbeddings, "layers.{}.", "norm", LlamaRotaryEmbedding),
    "qwen2": Family(DecoderLayer, DecoderEmbeddings, "layers.{}.", "norm", Qwen2RotaryEmbedding),
}


def _sources(names: dict[str, str | tuple[str, ...]], module: str) -> tuple[str, ...]:
    """The checkpoint module names one of our modules is built from (several for a fused one)."""
    theirs = names[module]
    return (theirs,) if isinstance(theirs, str) else theirs


def _checkpoint_names(names: dict[str, str | tuple[str, ...]], state_name: str) -> list[str]:
    module, leaf = state_name.rsplit(".", 1)
    return [f"{theirs}.{leaf}" for theirs in _sources(names, module)]


def _load(module: nn.Module, ckpt: Checkpoint, prefix: str) -> list[str]:
    """Fill `module` from the checkpoint tensors under `prefix` (a fused parameter: its parts
    concatenated along dim 0, in the map's order); returns the checkpoint names read."""
    names, state, read = module.checkpoint_names, {}, []
    for name in module.state_dict():
        parts = [prefix + c for c in _checkpoint_names(names, name)]
        tensors = [ckpt.tensor(c) for c in parts]
        state[name] = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        read += parts
    module.load_state_dict(state)
    return read


def has_layer(ckpt: Checkpoint, index: int) -> bool:
    """Whether the checkpoint's weights hold layer `index` (a scorer's saved backbone holds its lower layers only)."""
    family = FAMILIES[ckpt.family]
    names = family.layer.checkpoint_names
    return ckpt.has(family.layer_prefix.format(index) + _sources(names, next(iter(names)))[0] + ".weight")


def _layer_bias(ckpt: Checkpoint, family: Family, index: int) -> set[str]:
    """Which linears of checkpoint layer `index` carry a bias (the layer must exist)."""
    prefix, names = family.layer_prefix.format(index), family.layer.checkpoint_names
    if not has_layer(ckpt, index):
        raise CheckpointError(f"{ckpt.folder}: layer {index} is missing from the checkpoint")
    return {mine for mine in names if ckpt.has(f"{prefix}{_sources(names, mine)[0]}.bias")}


def _load_layer(layer: nn.Module, ckpt: Checkpoint, family: Family, index: int) -> list[str]:
    return _load(layer, ckpt, family.layer_prefix.format(index))


def _load_final_norm(norm: RMSNorm, ckpt: Checkpoint, family: Family) -> str:
    name = f"{family.final_norm}.weight"
    norm.weight.data.copy_(ckpt.tensor(name))
    return name


@contextlib.contextmanager
def _config_fits_weights(ckpt: Checkpoint) -> Iterator[None]:
    """Layers built from config.json and filled from the weights: a config that does not describe its
    weights (sizes, head counts, missing fields) fails in torch or transformers; say so as a CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError, ZeroDivisionError) as err:
        raise CheckpointError(f"{ckpt.folder}: config.json does not fit the weights "
                              f"({type(err).__name__}: {err})") from None


def _family(ckpt: Checkpoint, num_lower_layers: int) -> Family:
    if getattr(ckpt.config, "use_sliding_window", False):
        raise CheckpointError(f"{ckpt.folder}: sliding-window attention layers are not supported")
    if not 0 <= num_lower_layers <= ckpt.num_layers:
        raise CheckpointError(f"{ckpt.folder}: num_lower_layers must be in [0, {ckpt.num_layers}] for the "
                              f"{ckpt.num_layers} layers config.json names (num_hidden_layers), got {num_lower_layers}")
    return FAMILIES[ckpt.family]


class LowerEncoder(nn.Module):
    """Token embeddings + the first L layers, frozen, eval mode: tokens -> (.., d) token states.
    Positions are token positions inside each text (BERT: absolute embeddings; Llama/Qwen2: RoPE)."""

    def __init__(self, ckpt: Checkpoint, num_lower_layers: int) -> None:
        super().__init__()
        family = _family(ckpt, num_lower_layers)
        with _config_fits_weights(ckpt):
            self._build(ckpt, family, num_lower_layers)
        self.requires_grad_(False)
        self.eval()

    def _build(self, ckpt: Checkpoint, family: Family, num_lower_layers: int) -> None:
        self.family, self.num_layers, self.hidden_size = ckpt.family, num_lower_layers, ckpt.hidden_size
        self.embeddings = family.embeddings(ckpt.config)
        self.tensor_names = _load(self.embeddings, ckpt, "")
        self.layers = nn.ModuleList(family.layer(ckpt.config, _layer_bias(ckpt, family, i))
                                    for i in range(num_lower_layers))
        for i, layer in enumerate(self.layers):
            self.tensor_names += _load_layer(layer, ckpt, family, i)
        # With every layer in the lower part the final norm comes too, as in hidden_states[-1].
        self.norm = None
        if family.final_norm is not None and num_lower_layers == ckpt.num_layers:
            self.norm = RMSNorm(ckpt.hidden_size, ckpt.config.rms_norm_eps)
            self.tensor_names.append(_load_final_norm(self.norm, ckpt, family))
        self.rotary = RotaryTable(family.rotary(ckpt.config)) if family.rotary else None
        self.fingerprint = ckpt.fingerprint(self.tensor_names)

    def train(self, mode: bool = True) -> LowerEncoder:
        return super().train(False)  # frozen: dropout never active

    def forward_packed(self, ids: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
        """ids (T,) int64 packed token ids, offsets (B+1,) int64, max_len (host int) >= the longest
        text -> (T, d) token states. Ids and offsets are the caller's to validate (on the host)."""
        max_len = check_max_len(max_len, offsets, ids.numel())
        x = self.embeddings(ids, positions_in_sequence(offsets, ids.numel()), max_len)
        for layer in self.layers:
            x = layer(x, offsets, self.rotary, max_len)
        return self.norm(x) if self.norm is not None else x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, K), right-padded -> (B, K, d); padded positions are zero."""
        mask = _right_padded_mask(attention_mask)
        lengths = mask.sum(1)
        offsets = offsets_from_lengths(lengths)
        max_len = int(lengths.max()) if lengths.numel() else 0  # a boundary: the mask is read anyway
        return pad(self.forward_packed(input_ids[mask], offsets, max_len), offsets, input_ids.shape[1])[0]


class UpperEncoder(nn.Module):
    """The layers after the first L (+ the final norm for Llama/Qwen2), trainable: behavior
    embeddings -> contextual behavior states. Positions are behavior positions 0..M-1 inside each
    sequence. Llama/Qwen2 get them by RoPE (causal attention, oldest behavior first, no length cap).
    BERT layers carry no positions of their own (BERT adds absolute positions once, in its input
    embeddings, capped at 512): the engine adds a learned behavior-position embedding at the gather,
    so sequences of thousands of behaviors need no position table of BERT's.

    Built empty from a config (`has_bias[j]`: which of layer j's linears have a bias), then filled by
    `from_checkpoint` or by `load_state_dict` of a saved scorer. `causal`: every layer attends only to
    itself and earlier behaviors, BERT's too, so the state at position j is a function of behaviors
    0..j alone (what lets timeline training read every prefix of one forward)."""

    def __init__(self, config, num_lower_layers: int, has_bias: list[set[str]], causal: bool = False):
        super().__init__()
        family = FAMILIES[config.model_type]
        self.family, self.hidden_size = config.model_type, config.hidden_size
        self.layers = nn.ModuleList(family.layer(config, bias) for bias in has_bias)
        self.norm = None
        if family.final_norm and num_lower_layers < config.num_hidden_layers:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryTable(family.rotary(config)) if family.rotary else None
        if causal:  # BERT's layers read only earlier behaviors too (decoders' already do)
            for layer in self.layers:
                layer.attn.causal = True
        self.eval()  # dropout only once a trainer calls .train()

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, num_lower_layers: int, causal: bool = False) -> UpperEncoder:
        family = _family(ckpt, num_lower_layers)
        indices = range(num_lower_layers, ckpt.num_layers)
        with _config_fits_weights(ckpt):
            upper = cls(ckpt.config, num_lower_layers, [_layer_bias(ckpt, family, i) for i in indices], causal)
            for layer, i in zip(upper.layers, indices):
                _load_layer(layer, ckpt, family, i)
            if upper.norm is not None:
                _load_final_norm(upper.norm, ckpt, family)
        return upper

    @staticmethod
    def has_bias_from_state(state_keys: list[str], prefix: str, num_layers: int) -> list[set[str]]:
        """Which linears of each saved layer `{prefix}{j}.<name>.bias` carry a bias (fused names:
        a state saved with separate q/k/v or gate/up counts as its fused module's)."""
        found: list[set[str]] = [set() for _ in range(num_layers)]
        for key in state_keys:
            if key.startswith(prefix) and key.endswith(".bias"):
                index, name = key[len(prefix):-len(".bias")].split(".", 1)
                found[int(index)].add(LEGACY_FUSED_NAMES.get(name, name))
        return found

    def forward_packed(self, x: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
        """x (T, d) packed behavior embeddings, offsets (B+1,) int64, max_len (host int) >= the
        longest sequence -> (T, d). Reads no device value."""
        max_len = check_max_len(max_len, offsets, x.shape[0])
        for layer in self.layers:
            x = layer(x, offsets, self.rotary, max_len)
        return self.norm(x) if self.norm is not None else x

    def forward(self, behavior_embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """behavior_embeddings (B, M, d), lengths (B,) -> (B, M, d); positions past a length are zero."""
        width = behavior_embeddings.shape[1]
        mask = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
        offsets = offsets_from_lengths(lengths)
        max_len = min(int(lengths.max()), width) if lengths.numel() else 0  # a boundary: the mask is read anyway
        return pad(self.forward_packed(behavior_embeddings[mask], offsets, max_len), offsets, width)[0]


def _right_padded_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]):
        raise ValueError("attention_mask must be right-padded (ones first, then zeros)")
    return mask


def split_checkpoint(folder: str | Path | Checkpoint, num_lower_layers: int) -> tuple[LowerEncoder, UpperEncoder]:
    """(frozen lower, trainable upper) of a local checkpoint, split after `num_lower_layers` layers."""
    ckpt = folder if isinstance(folder, Checkpoint) else Checkpoint(folder)
    return LowerEncoder(ckpt, num_lower_layers), UpperEncoder.from_checkpoint(ckpt, num_lower_layers)


def save_lower_checkpoint(ckpt: Checkpoint, lower: LowerEncoder, folder: str | Path) -> None:
    """Write a checkpoint folder holding only what `lower` needs (config, tokenizer, its tensors,
    stored bytes unchanged so the fingerprint is the same), each file written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.save_small_files(folder)
    sources = [source_of(name, ckpt.tensor(name)) for name in lower.tensor_names]
    with atomic_write(folder / "model.safetensors") as handle:
        write_safetensors(handle, sources, {"format": "pt", "bahe_lower_layers": str(lower.num_layers)})
