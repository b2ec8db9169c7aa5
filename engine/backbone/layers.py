"""Transformer layers of the supported families, written over the packed ragged layout
(x (T, d), offsets (B+1,) int64): every op but attention is per token, and attention runs through
the dispatched variable-length op (`kernels.ops`), so no padding is ever computed. The math is
exactly Hugging Face's (tests compare against transformers' own forward).

Projections are fused: attention's q, k and v are one Linear `qkv` (rows: q's, then k's, then
v's) and the gated MLP's gate and up are one Linear `gate_up` (gate's rows, then up's), so each
runs as one GEMM; the outputs are split with views. The checkpoint maps below name the separate
checkpoint tensors each fused parameter is concatenated from, and a load-time hook converts a
state dict saved with separate `attn.q/k/v` / `gate`/`up` keys (scorers saved before the fusion).

Every forward takes `max_len`, a host int bounding the longest sequence (known at the boundary),
so no layer reads a device value."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN

from kernels import ops

# The state-dict names of our modules -> the checkpoint's names (relative to the layer prefix);
# a tuple: the fused parameter is the concatenation (dim 0, in this order) of those tensors.
BERT_LAYER_NAMES = {
    "attn.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attn.o": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm",
}
DECODER_LAYER_NAMES = {
    "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.o": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": "mlp.down_proj",
}
# State-dict module names before the fusion -> the fused module holding them (saved scorers).
LEGACY_FUSED_NAMES = {"attn.q": "attn.qkv", "attn.k": "attn.qkv", "attn.v": "attn.qkv",
                      "gate": "gate_up", "up": "gate_up"}


def fuse_legacy_keys(state: dict[str, torch.Tensor], prefix: str, parts: tuple[str, ...], fused: str) -> None:
    """In place: replace `{prefix}{part}.weight|bias` of every part by their concatenation (dim 0,
    in order) under `{prefix}{fused}.weight|bias` (a state dict saved before the fusion)."""
    for leaf in ("weight", "bias"):
        keys = [f"{prefix}{part}.{leaf}" for part in parts]
        if all(key in state for key in keys):
            state[f"{prefix}{fused}.{leaf}"] = torch.cat([state.pop(key) for key in keys])


def _fuse_legacy_qkv(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *_) -> None:
    fuse_legacy_keys(state, prefix, ("q", "k", "v"), "qkv")  # load_state_dict pre-hook of PackedAttention


def _fuse_legacy_gate_up(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *_) -> None:
    fuse_legacy_keys(state, prefix, ("gate", "up"), "gate_up")  # load_state_dict pre-hook of DecoderLayer
BERT_EMBEDDING_NAMES = {
    "word": "embeddings.word_embeddings", "position": "embeddings.position_embeddings",
    "token_type": "embeddings.token_type_embeddings", "norm": "embeddings.LayerNorm",
}


class RMSNorm(nn.Module):
    """Llama/Qwen2 RMSNorm (normalize in fp32, scale in the input dtype)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryTable(nn.Module):
    """cos/sin tables (P, Dh) fp32 for positions 0..P-1, from the family's own Hugging Face rotary
    module (so every rope_type and scaling of the config is honored); grown on demand."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary
        self._cos = self._sin = None

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < length or self._cos.device != device:
            size = 1 << max(6, (length - 1).bit_length())
            pos = torch.arange(size, device=device)[None]
            probe = torch.zeros(1, dtype=torch.float32, device=device)
            cos, sin = self.rotary.to(device)(probe, pos)
            self._cos, self._sin = cos[0].float(), sin[0].float()
        return self._cos, self._sin


class PackedAttention(nn.Module):
    """Multi-head (grouped-query) self-attention inside each packed sequence. One fused projection
    `qkv` (hidden -> (H + 2 Hkv) Dh); q (T, H, Dh), k and v (T, Hkv, Dh) are strided views of its
    output, which the kernels take as they are."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, qkv_bias: bool, o_bias: bool,
                 causal: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.causal = heads, kv_heads, head_dim, causal
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim, bias=qkv_bias)
        self.o = nn.Linear(heads * head_dim, hidden, bias=o_bias)
        self.register_load_state_dict_pre_hook(_fuse_legacy_qkv)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> q (T, H, Dh), k, v (T, Hkv, Dh): views of one fused GEMM's output, before RoPE."""
        heads, kv_heads = self.heads, self.kv_heads
        qkv = self.qkv(x).view(x.shape[0], heads + 2 * kv_heads, self.head_dim)
        return qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output (T, H, Dh) -> (T, hidden)."""
        return self.o(out.reshape(out.shape[0], self.heads * self.head_dim))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, rotary: RotaryTable | None,
                max_len: int) -> torch.Tensor:
        q, k, v = self.project(x)
        if rotary is not None:
            cos, sin = rotary.tables(max_len, x.device)
            q, k = ops.rope(q, k, offsets, cos, sin, max_len=max_len)
        out = ops.varlen_attention(q, k, v, offsets, causal=self.causal, max_len=max_len, scale=self.scale)
        return self.output(out)


class BertLayer(nn.Module):
    """BERT post-LayerNorm encoder layer, bidirectional."""
    checkpoint_names = BERT_LAYER_NAMES

    def __init__(self, config, has_bias: set[str]) -> None:
        super().__init__()
        d, heads = config.hidden_size, config.num_attention_heads
        self.attn = PackedAttention(d, heads, heads, d // heads, True, True, causal=False)
        self.attn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(d, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, rotary: RotaryTable | None, max_len: int) -> torch.Tensor:
        return self.forward_with(x, lambda h: self.attn(h, offsets, rotary, max_len))

    def forward_with(self, x: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The layer with attention given: `attend` maps the attention input (T, d) to its output (T, d)
        (engine.serving.incremental attends over cached keys/values; everything else is this layer's own)."""
        x = self.attn_norm(x + self.dropout(attend(x)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(self.act(self.ffn_in(x)))))


class DecoderLayer(nn.Module):
    """Llama/Qwen2 pre-RMSNorm decoder layer: causal GQA attention with RoPE, gated MLP."""
    checkpoint_names = DECODER_LAYER_NAMES

    def __init__(self, config, has_bias: set[str]) -> None:
        super().__init__()
        d = config.hidden_size
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        self.attn = PackedAttention(d, heads, kv_heads, head_dim, "attn.qkv" in has_bias, "attn.o" in has_bias,
                                    causal=True)
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, config.rms_norm_eps)
        mlp_bias = "gate_up" in has_bias
        self.intermediate = config.intermediate_size
        self.gate_up = nn.Linear(d, 2 * config.intermediate_size, bias=mlp_bias)  # gate's rows, then up's
        self.down = nn.Linear(config.intermediate_size, d, bias=mlp_bias)
        self.act = ACT2FN[config.hidden_act]
        self.register_load_state_dict_pre_hook(_fuse_legacy_gate_up)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, rotary: RotaryTable | None, max_len: int) -> torch.Tensor:
        return self.forward_with(x, lambda h: self.attn(h, offsets, rotary, max_len))

    def forward_with(self, x: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The layer with attention given (see `BertLayer.forward_with`)."""
        x = x + attend(self.attn_norm(x))
        gate_up = self.gate_up(self.ffn_norm(x))
        return x + self.down(self.act(gate_up[:, :self.intermediate]) * gate_up[:, self.intermediate:])


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type-0 embeddings, LayerNorm (BERT's input layer)."""
    checkpoint_names = BERT_EMBEDDING_NAMES

    def __init__(self, config) -> None:
        super().__init__()
        d = config.hidden_size
        self.word = nn.Embedding(config.vocab_size, d)
        self.position = nn.Embedding(config.max_position_embeddings, d)
        self.token_type = nn.Embedding(config.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, max_len: int) -> torch.Tensor:
        """ids, positions (T,) int64; max_len (host int) bounds the longest text (positions < max_len)."""
        if max_len > self.position.num_embeddings:
            raise ValueError(f"a text of {max_len} tokens exceeds the model's "
                             f"{self.position.num_embeddings} positions")
        x = self.word(ids) + self.token_type.weight[0] + self.position(positions)
        return self.norm(x)


class DecoderEmbeddings(nn.Module):
    """Token embeddings only: decoders add positions by RoPE inside attention."""
    checkpoint_names = {"word": "embed_tokens"}

    def __init__(self, config) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, max_len: int) -> torch.Tensor:
        return self.word(ids)
