"""Atomic Behavior Encoding (offline): each unique behavior text -> tokens -> frozen lower layers ->
masked mean over its real tokens -> one d-vector (a behavior-table row)."""
from __future__ import annotations

import threading

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.config import POOLINGS
from engine.encoding.text_checks import InputError, check_visible, text_list
from engine.model.packing import pack_lists
from kernels import ops
from weights.checkpoint import Checkpoint
from engine.backbone.split import LowerEncoder
from weights.table import ModelSignature

PROGRESS_MIN_BATCHES = 4  # show a progress bar only for work of at least this many batches
BATCH_TOLERANCE = 1e-5  # |row - the same text's row encoded with other texts| <= this * max |row|


def default_pooling(family: str) -> str:
    """BERT: mean over every token ([CLS] and [SEP] included, as sentence-transformers pools).
    Llama/Qwen2: mean over the tokens after the first. A causal LM's first token is an attention
    sink whose state is tens of times larger than the others' (SmolLM2 at layer 27: norm ~22,000
    vs ~500), so averaging it in would make every row mostly that one vector."""
    return "mean" if family == "bert" else "mean_after_first"


def pooled_offsets(offsets: np.ndarray, pooling: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The tokens a pooling averages: new offsets and the packed positions kept (None: all).
    'mean_after_first' drops each text's first token unless it is the only one."""
    if pooling == "mean":
        return offsets, None
    lengths = np.diff(offsets)
    skip = (lengths > 1).astype(np.int64)
    keep = np.ones(int(offsets[-1]), dtype=bool)
    keep[offsets[:-1][skip == 1]] = False
    return np.concatenate([[0], np.cumsum(lengths - skip)]), np.nonzero(keep)[0]


class AtomicEncoder:
    """Texts -> (n, d) float32 rows with the frozen lower layers. Texts are tokenized (truncated to
    `max_tokens`), sorted by length and packed without padding into batches of `token_budget`
    tokens; each row is the mean of the text's token states per `pooling` (see `default_pooling`).
    Thread-safe.

    A row depends on the other texts of the call only in its last bits (float32 rounding): they set
    the padding of the attention's length buckets and the shapes of the matrix products. Measured
    (MiniLM, 3 lower layers, CPU, 300 texts together vs each alone): at most 1.7e-6 absolute, 7e-7 of
    the row's largest entry; `BATCH_TOLERANCE` is the bound tests/encoding/test_abe.py holds it to."""

    def __init__(self, lower: LowerEncoder, tokenizer, *, max_tokens: int = 32, token_budget: int = 8192,
                 pooling: str = "auto", device: torch.device | str = "cpu", progress: bool = True) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        pooling = default_pooling(lower.family) if pooling == "auto" else pooling
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be 'auto' or one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.lower = lower.to(device)
        self.tokenizer = tokenizer
        self.max_tokens, self.token_budget, self.device, self.progress = max_tokens, token_budget, torch.device(device), progress
        self.signature = ModelSignature(fingerprint=lower.fingerprint, family=lower.family,
                                        hidden_size=lower.hidden_size, num_lower_layers=lower.num_layers,
                                        pooling=pooling, max_tokens=max_tokens)
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share across threads

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, num_lower_layers: int, **kwargs) -> AtomicEncoder:
        return cls(LowerEncoder(ckpt, num_lower_layers), ckpt.tokenizer, **kwargs)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Packed token ids (sum K,) int64 and per-text lengths (n,) int64."""
        texts = text_list(texts, "texts")
        with self._tokenizer_lock:
            ids = self.tokenizer(texts, truncation=True, max_length=self.max_tokens,
                                 add_special_tokens=True)["input_ids"]
        flat, lengths = pack_lists(ids)
        if lengths.size and lengths.min() == 0:
            raise ValueError(f"text {texts[int(np.argmin(lengths))]!r} tokenizes to no tokens")
        return flat, lengths

    def _batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Indices of texts sorted by length, cut greedily into runs of at most `token_budget` tokens
        (a single text longer than the budget gets a batch of its own)."""
        order = np.argsort(lengths, kind="stable")
        batches, start, used = [], 0, 0
        for i, length in enumerate(lengths[order].tolist()):
            if used + length > self.token_budget and i > start:
                batches.append(order[start:i])
                start, used = i, 0
            used += length
        batches.append(order[start:])
        return batches

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(n, d) float32 CPU rows: masked mean of the lower layers' token states of each text. InputError for
        a text with no visible content (`check_visible`); TypeError for a bare str (a list of texts is due)."""
        texts = text_list(texts, "texts")
        for i, text in enumerate(texts):
            try:
                check_visible(text)
            except ValueError as err:
                raise InputError(f"texts[{i}]: {err}") from None
        out = torch.empty(len(texts), self.lower.hidden_size, dtype=torch.float32)
        if not texts:
            return out
        flat, lengths = self.tokenize(texts)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        batches = self._batches(lengths)
        bar = tqdm(total=len(texts), desc="ABE encode", unit="text", disable=not self.progress or
                   len(batches) < PROGRESS_MIN_BATCHES)
        for chunk in batches:
            offsets = np.concatenate([[0], np.cumsum(lengths[chunk])])
            ids = flat[np.repeat(starts[chunk] - offsets[:-1], lengths[chunk]) + np.arange(offsets[-1])]
            ids_t = torch.from_numpy(ids).to(self.device)
            offsets_t = torch.from_numpy(offsets).to(self.device)
            longest = int(lengths[chunk].max())  # on the host, from the numpy lengths
            states = self.lower.forward_packed(ids_t, offsets_t, longest)
            pool_offsets, kept = pooled_offsets(offsets, self.pooling)
            if kept is not None:
                states = states[torch.from_numpy(kept).to(self.device)]
            pooled = ops.jagged_mean(states, torch.from_numpy(pool_offsets).to(self.device))
            out[torch.from_numpy(chunk)] = pooled.float().cpu()
            bar.update(chunk.size)
        bar.close()
        return out


class ReusingEncoder:
    """Encodes through `encoder`, but copies the rows `table` already holds for the same texts
    (same model signature, so the same rows): an item table built after a behavior table whose
    texts it shares (MovieLens: behaviors are items) costs no second encoding."""

    def __init__(self, encoder: AtomicEncoder, table) -> None:
        table.signature.check_matches(encoder.signature, str(table.path))
        self.encoder, self.table, self.signature = encoder, table, encoder.signature

    def encode(self, texts: list[str]) -> torch.Tensor:
        texts = text_list(texts, "texts")
        rows = self.table.lookup(texts, on_missing="mark")
        out = torch.empty(len(texts), self.signature.hidden_size, dtype=torch.float32)
        known = rows >= 0
        if known.any():
            out[torch.from_numpy(known)] = self.table.float_rows(torch.from_numpy(rows[known]))
        if not known.all():
            fresh = np.nonzero(~known)[0]
            out[torch.from_numpy(fresh)] = self.encoder.encode([texts[i] for i in fresh])
        return out
