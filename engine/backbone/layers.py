"""Transformer layers of the supported families, written over the packed ragged layout
(x (T, d), offsets (B+1,) int64): every op but attention is per token, and attention runs through
the dispatched variable-length op (`kernels.ops`), so no padding is ever computed. The math is
exactly Hugging Face's (tests compare against transformers' own forward)."""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN

from kernels import ops

# The state-dict names of our modules -> the checkpoint's names (relative to the layer prefix).
BERT_LAYER_NAMES = {
    "attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm",
}
DECODER_LAYER_NAMES = {
    "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
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
    """Multi-head (grouped-query) self-attention inside each packed sequence."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, qkv_bias: bool, o_bias: bool,
                 causal: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.causal = heads, kv_heads, head_dim, causal
        self.q = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o = nn.Linear(heads * head_dim, hidden, bias=o_bias)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, rotary: RotaryTable | None,
                longest: int) -> torch.Tensor:
        total = x.shape[0]
        q = self.q(x).view(total, self.heads, self.head_dim)
        k = self.k(x).view(total, self.kv_heads, self.head_dim)
        v = self.v(x).view(total, self.kv_heads, self.head_dim)
        if rotary is not None:
            cos, sin = rotary.tables(longest, x.device)
            q, k = ops.rope(q, k, offsets, cos, sin)
        out = ops.varlen_attention(q, k, v, offsets, causal=self.causal, scale=1.0 / math.sqrt(self.head_dim))
        return self.o(out.reshape(total, self.heads * self.head_dim))


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

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, rotary: RotaryTable | None, longest: int) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, offsets, rotary, longest)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(self.act(self.ffn_in(x)))))


class DecoderLayer(nn.Module):
    """Llama/Qwen2 pre-RMSNorm decoder layer: causal GQA attention with RoPE, gated MLP."""
    checkpoint_names = DECODER_LAYER_NAMES

    def __init__(self, config, has_bias: set[str]) -> None:
        super().__init__()
        d = config.hidden_size
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        self.attn = PackedAttention(d, heads, kv_heads, head_dim, "attn.q" in has_bias, "attn.o" in has_bias,
                                    causal=True)
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, config.rms_norm_eps)
        mlp_bias = "gate" in has_bias
        self.gate = nn.Linear(d, config.intermediate_size, bias=mlp_bias)
        self.up = nn.Linear(d, config.intermediate_size, bias=mlp_bias)
        self.down = nn.Linear(config.intermediate_size, d, bias=mlp_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, rotary: RotaryTable | None, longest: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), offsets, rotary, longest)
        h = self.ffn_norm(x)
        return x + self.down(self.act(self.gate(h)) * self.up(h))


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

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if positions.numel() and int(positions.max()) >= self.position.num_embeddings:
            raise ValueError(f"a text of {int(positions.max()) + 1} tokens exceeds the model's "
                             f"{self.position.num_embeddings} positions")
        x = self.word(ids) + self.token_type.weight[0] + self.position(positions)
        return self.norm(x)


class DecoderEmbeddings(nn.Module):
    """Token embeddings only: decoders add positions by RoPE inside attention."""
    checkpoint_names = {"word": "embed_tokens"}

    def __init__(self, config) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.word(ids)
