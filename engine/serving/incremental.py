"""Incremental users: a served user's per-layer keys and values kept (`UserState`), so appending k behaviors
to it costs O(k M) work instead of the O(M^2) of running its window through the upper layers again.

With causal upper layers (`ModelConfig.attention == "causal"`, or a decoder family) the state at window
position j depends on the window's behaviors 0..j alone. Appending k behaviors to a window of W therefore
leaves the W states, and every layer's keys and values of those positions, as they were: per layer only the k
new rows are projected, their queries attend over the W cached keys/values and their own (causal inside the
new block), and their final states are added to the window's running sum, whose mean is the pooled sequence
vector the head reads (`BAHEModel.user_states`). Positions continue from the window's: the learned behavior
position W + i at the gather, RoPE position W + i for Llama/Qwen2. The layers run their own code with the
attention given (`forward_with`), so residuals and norms (BERT post-LN, decoders pre-RMSNorm, final norm)
are exactly the packed path's.

Windows (engine.features.history_window): a sequence is read from `ModelConfig.window_start(length)`, a multiple of
the step S. While appends leave the start where it was, the cached keys/values stay valid; when the start
moves (the history crossed the next multiple of S past M), the sequence's new window (at most M behaviors,
all held by the state) runs through the layers whole - once per S appends, so O(M^2 / S) = O(M) amortized
per append at the default S = M / 4.

What a state holds, per sequence: per upper layer the window's keys and values, 2 * W * Hkv * Dh values
(Hkv * Dh = d for BERT and multi-head models, less with grouped-query attention), in the model's compute
dtype; the float64 sum of the final states (d values); the texts still read (the window, and the last
`recent_events` for the count features) and two counts. So a cached user takes about
    bytes = sum over sequences of  L * 2 * W * Hkv * Dh * bytes_per_value  +  8 d
(L upper layers, W <= max_behaviors its window's length), besides references to its texts; `UserState.nbytes`
gives the exact tensor bytes. The similarity and count features read the ABE rows and texts, never the
states: a state keeps its window's table rows (and a `rank` of it looks no text up) when every window text is a
row of the table; a window holding texts encoded on the fly has its texts looked up again at each `rank`.

A state is immutable: `extend` returns a new one (sharing the unchanged sequences) and leaves the old valid,
so states can be cached and read from several threads. It carries the `PipelineVersion` it was computed at
(the weights and the tables' lengths) and is refused once the scorer's version no longer serves it (other
weights, or a table shorter than it was: engine.serving.pipeline). Scoring through a state follows the
reference attention (plain PyTorch), on the CPU and on CUDA alike; on CUDA the packed path takes the Triton
kernels, so the two agree to rounding.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.serving.inputs import InputError, check_visible, parse_history_counts, parse_users, read_windows, user_sequences
from engine.model.bahe_model import BAHEModel, add_id_rows, gather_rows
from engine.serving.pipeline import PipelineVersion, ScoringBatch, ScoringPipeline
from engine.serving.transfer import to_device
from engine.serving.ranking import Ranking, check_top_k, parse_candidates, ranking
from engine.features.side_features import recent_counts
from engine.model.stages import stage
from engine.serving.scorer_setup import kernel_path
from kernels import ops
from weights.text_key import normalize_text


@dataclass(frozen=True)
class SequenceState:
    """One named sequence of a cached user.
    texts: its last behaviors, oldest first: the window and, before it, those of the last `recent_events` it
    lacks; total: how many behaviors the sequence has had (texts are the last of them); start: the window's
    first behavior, ModelConfig.window_start(total); counted: the count features' value (total, or the
    caller's history_counts); keys, values: per upper layer (W, Hkv, Dh), W = total - start, keys after RoPE;
    state_sum: (d,) float64, the sum of the window's final states; rows: (W,) int64 the window's behavior-table
    rows when every window text was a row of the table (rows only get appended, so they stay valid while the
    state does; a rank then looks no text up), None when some were encoded on the fly."""
    texts: tuple[str, ...]
    total: int
    start: int
    counted: int
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    state_sum: torch.Tensor
    rows: np.ndarray | None = None

    @property
    def window(self) -> tuple[str, ...]:
        """The behaviors the upper layers read (W of them)."""
        return self.texts[self.start - (self.total - len(self.texts)):]


@dataclass(frozen=True)
class UserState:
    """A user's cached upper-layer state (`BAHEScorer.user_state`, `extend_user`), usable by `rank`.
    sequences: one per `names` (the scorer's `ModelConfig.sequence_names`), in that order; version: the
    scorer pipeline's version it was computed at (weights, compute dtype, table lengths)."""
    sequences: tuple[SequenceState, ...]
    version: PipelineVersion
    names: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the state's tensors (keys, values, sums); texts are references to the caller's strings."""
        return sum(t.numel() * t.element_size() for s in self.sequences for t in (*s.keys, *s.values, s.state_sum))

    @property
    def lengths(self) -> dict[str, int]:
        """Sequence name -> how many behaviors it has had (all appends included)."""
        return {name: s.total for name, s in zip(self.names, self.sequences)}


def check_causal(model: BAHEModel) -> None:
    """ValueError unless every upper layer is causal (a bidirectional layer's old states change with each
    append: nothing can be kept)."""
    if not all(layer.attn.causal for layer in model.upper.layers):
        raise ValueError(f"incremental user states need causal upper layers; this scorer's {model.upper.family} "
                         f"layers attend both ways (ModelConfig.attention={model.config.attention!r}); use "
                         f"score/rank on the whole user, or a scorer built with attention='causal'")


def cached_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """k new queries q (k, H, Dh) at the last k of P positions, over keys, values (P, Hkv, Dh) (the cached
    ones, then the k new ones): query i reads keys 0..P-k+i -> (k, H, Dh). Query head h reads key/value head
    h // (H / Hkv). O(k P) scores."""
    k, total = q.shape[0], keys.shape[0]
    mask = torch.arange(total, device=q.device)[None, :] <= torch.arange(total - k, total, device=q.device)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                         values.transpose(0, 1)[None], attn_mask=mask[None, None], scale=scale,
                                         enable_gqa=q.shape[1] != keys.shape[1])
    return out[0].transpose(0, 1)


def append_window(model: BAHEModel, behavior_table: torch.Tensor, rows: torch.Tensor, extra: torch.Tensor | None,
                  keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...],
                  state_sum: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor]:
    """Append k behaviors (table rows (k,) int64, ids >= N index `extra`) to a window of W cached positions
    (keys, values: per layer (W, Hkv, Dh); state_sum (d,) float64) -> the W + k window's keys, values and sum.
    Positions W..W+k-1 (behavior position embedding, RoPE). W = 0 builds a window from nothing."""
    upper, k, position = model.upper, rows.numel(), keys[0].shape[0]
    offsets = torch.arange(2, device=rows.device) * k  # [0, k], made on the device: no transfer
    pos = None if model.behavior_pos is None else model.behavior_pos[position:]
    x = add_id_rows(gather_rows(behavior_table, extra, rows, offsets, pos, k, model.compute_dtype),
                    model.behavior_id_rows, rows)
    new_keys, new_values = [], []
    for layer, cached_k, cached_v in zip(upper.layers, keys, values):
        def attend(h: torch.Tensor, attn=layer.attn, cached_k=cached_k, cached_v=cached_v) -> torch.Tensor:
            q, key, value = attn.project(h)
            if upper.rotary is not None:
                cos, sin = upper.rotary.tables(position + k, h.device)
                q, key = ops.rope(q, key, offsets, cos[position:], sin[position:], max_len=k)
            new_keys.append(torch.cat([cached_k, key]))
            new_values.append(torch.cat([cached_v, value]))
            return attn.output(cached_attention(q, new_keys[-1], new_values[-1], attn.scale))
        x = layer.forward_with(x, attend)
    final = upper.norm(x) if upper.norm is not None else x
    return tuple(new_keys), tuple(new_values), state_sum + final.double().sum(0)


def _empty_window(model: BAHEModel, device: torch.device) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Per layer (0, Hkv, Dh) keys and values: a window with nothing cached."""
    empty = tuple(torch.empty(0, layer.attn.kv_heads, layer.attn.head_dim, dtype=model.compute_dtype, device=device)
                  for layer in model.upper.layers)
    return empty, empty


def _recent_kept(scorer) -> int:
    config = scorer.config.model
    return config.recent_events if config.count_features else 0


def _advance(scorer, previous: list[SequenceState | None], texts: list[list[str]], totals: list[int],
             counted: list[int]) -> UserState:
    """The state of sequences whose last behaviors are texts[s] (total totals[s]): previous[s] kept and extended
    where given and its window start stands, the window built whole otherwise."""
    model, device, pipeline = scorer.model, scorer.device, scorer.pipeline
    starts = [int(scorer.config.model.window_start(t)) for t in totals]
    windows = [seq[start - (total - len(seq)):] for seq, start, total in zip(texts, starts, totals)]
    reuse = [p if p is not None and p.start == start else None for p, start in zip(previous, starts)]
    fresh = [w[len(p.window):] if p is not None else w for w, p in zip(windows, reuse)]
    lengths = np.array([len(f) for f in fresh], dtype=np.int64)
    with pipeline.lock, stage("lookup"), kernel_path(scorer.kernels):
        rows, extra = pipeline.lookup("behaviors", [t for f in fresh for t in f],
                                      scorer.config.scoring.unknown_behavior, lengths, users=[0])
        table, version, known = pipeline.table_rows("behaviors"), pipeline.version(), len(pipeline.behaviors)
    bounds, out, keep = np.concatenate([[0], np.cumsum(lengths)]), [], _recent_kept(scorer)
    dev = to_device({"rows": rows, "extra": extra}, device)
    with torch.inference_mode(), kernel_path(scorer.kernels), stage("upper_layers"):
        for s, (seq, total, start) in enumerate(zip(texts, totals, starts)):
            if lengths[s] == 0 and reuse[s] is not None and reuse[s].total == total:
                out.append(reuse[s])
                continue
            if reuse[s] is not None:
                keys, values, state_sum = reuse[s].keys, reuse[s].values, reuse[s].state_sum
            else:
                keys, values = _empty_window(model, device)
                state_sum = torch.zeros(model.upper.hidden_size, dtype=torch.float64, device=device)
            if lengths[s]:
                chunk = dev["rows"][bounds[s]:bounds[s + 1]]
                keys, values, state_sum = append_window(model, table, chunk, dev["extra"], keys, values, state_sum)
            first = min(start, max(total - keep, 0))  # the window and the last `recent_events`
            new_rows = rows[bounds[s]:bounds[s + 1]]
            kept = reuse[s].rows if reuse[s] is not None else np.empty(0, dtype=np.int64)
            window_rows = (None if kept is None or (new_rows >= known).any()  # ids >= known: encoded on the fly
                           else np.concatenate([kept, new_rows]))
            out.append(SequenceState(tuple(seq[first - (total - len(seq)):]), total, start, counted[s], keys, values,
                                     state_sum, window_rows))
    return UserState(tuple(out), version, scorer.config.model.sequence_names)


def build_state(scorer, user: dict[str, Sequence[str]], history_counts: dict[str, int] | None) -> UserState:
    """`BAHEScorer.user_state`: each sequence's window through the layers once, its keys/values kept."""
    check_causal(scorer.model)
    whole = parse_users([user], scorer.config)
    counted = parse_history_counts(None if history_counts is None else [history_counts], [user],
                                   scorer.config.model.sequence_names)[0]
    read_windows(whole, scorer.config, [0])  # the texts read before the windows (recent counts) must be texts
    sequences = whole[0]
    return _advance(scorer, [None] * len(sequences), sequences, [len(s) for s in sequences], counted.tolist())


def _new_behaviors(scorer, behaviors: object) -> list[list[str]]:
    """behaviors: dict sequence name -> list of behavior texts to append, oldest first (names left out: none)."""
    out = user_sequences(behaviors, scorer.config, "behaviors", "new behavior texts")
    for name, texts in zip(scorer.config.model.sequence_names, out):
        for j, text in enumerate(texts):
            try:
                normalize_text(text)
                check_visible(text)
            except (TypeError, ValueError) as err:
                raise InputError(f"behaviors[{name!r}][{j}]: {err}") from None
    return out


class StaleStateError(ValueError):
    """A UserState computed with other weights, dtype or tables than the scorer has now."""


def check_state(scorer, state: object) -> UserState:
    if not isinstance(state, UserState):
        raise InputError(f"expected a UserState (from BAHEScorer.user_state), got {type(state).__name__}")
    check_causal(scorer.model)
    if state.names != scorer.config.model.sequence_names or not scorer.pipeline.version().serves(state.version):
        raise StaleStateError("this UserState was computed with other weights, dtype, tables or sequence names than "
                              "the scorer has now; build it again with scorer.user_state(user)")
    return state


def extend_state(scorer, state: UserState, behaviors: dict[str, Sequence[str]]) -> UserState:
    """`BAHEScorer.extend_user`: k new behaviors per sequence, O(k M) while the window start stands."""
    state = check_state(scorer, state)
    new = _new_behaviors(scorer, behaviors)
    old = state.sequences
    return _advance(scorer, list(old), [list(s.texts) + n for s, n in zip(old, new)],
                    [s.total + len(n) for s, n in zip(old, new)], [s.counted + len(n) for s, n in zip(old, new)])


def pooled(model: BAHEModel, state: UserState) -> torch.Tensor:
    """(1, n, d) pooled sequence vectors: each window's mean final state, or its name's empty vector."""
    rows = [(s.state_sum / (s.total - s.start)).to(model.compute_dtype) if s.total > s.start
            else model.empty_sequence[i] for i, s in enumerate(state.sequences)]
    return torch.stack(rows)[None]


def score_states(scorer, states: Sequence[UserState], pair_user: np.ndarray,
                 items: Callable[[ScoringPipeline], tuple[np.ndarray, np.ndarray | None]],
                 categories: np.ndarray | None, per_user: bool) -> np.ndarray:
    """(P,) probabilities of pairs (states[pair_user[p]], item p) from the states' pooled vectors (no upper layer
    runs), the window rows and texts they keep and their counts for the side features. `items(pipeline)`, called
    under the pipeline's lock, gives the pairs' item rows (ids >= N index the (X, d) rows it returns beside);
    categories: (P, F) buckets or None; per_user: each state's pairs contiguous (rank), else any order (score).
    StaleStateError when the tables' version does not serve every state (checked under the lock, with the tables)."""
    pipeline, config, n = scorer.pipeline, scorer.config.model, len(scorer.config.model.sequence_names)
    sequences = [s for state in states for s in state.sequences]
    lengths = np.array([s.total - s.start for s in sequences], dtype=np.int64)
    with pipeline.lock, stage("lookup"), kernel_path(scorer.kernels):
        if all(s.rows is not None for s in sequences):  # every window row kept: no text is looked up
            behavior_rows = np.concatenate([s.rows for s in sequences]).astype(np.int64, copy=False)
            behavior_extra = None
        else:
            behavior_rows, behavior_extra = pipeline.lookup("behaviors", [t for s in sequences for t in s.window],
                                                            scorer.config.scoring.unknown_behavior, lengths,
                                                            users=list(range(len(states))))
        item_rows, item_extra = items(pipeline)
        tables = pipeline.placed()
    if not all(tables.version.serves(state.version) for state in states):
        raise StaleStateError("a UserState was computed with other weights, dtype or tables than the scorer has now")
    recent = (recent_counts([[list(s.texts) for s in state.sequences] for state in states], config.recent_events, n,
                            lengths=np.array([[s.total for s in state.sequences] for state in states]))
              if config.count_features and config.recent_events else None)
    user_counts = np.array([[s.counted for s in state.sequences] for state in states], dtype=np.int64)[pair_user]
    with torch.inference_mode():
        user = torch.cat([pooled(scorer.model, state) for state in states])
    batch = ScoringBatch(behavior_rows, np.concatenate([[0], np.cumsum(lengths)]), item_rows, pair_user, user_counts,
                         recent, categories, behavior_extra, item_extra)
    return pipeline.score(batch, tables, per_user=per_user, user=user)


def rank_state(scorer, state: UserState, candidates: Sequence[str], top_k: int | None,
               side_features: dict | None, candidate_features: Sequence[dict | None] | None = None) -> Ranking:
    """`BAHEScorer.rank` of a UserState: its pooled vectors (no upper layer runs), the window rows or texts and
    counts for the side features, each candidate's own features under the user's, the head over the candidates
    (`score_states`)."""
    check_top_k(top_k)
    state = check_state(scorer, state)
    items = parse_candidates([candidates], 1)[0]
    pair_user = np.zeros(len(items), dtype=np.int64)
    categories = scorer.pipeline.ranked_categories(None if side_features is None else [side_features],
                                                   candidate_features, pair_user, 1)
    if not items:
        return ranking(np.empty(0, dtype=np.float32), top_k)

    def lookup(pipeline: ScoringPipeline) -> tuple[np.ndarray, np.ndarray | None]:
        return pipeline.lookup("items", items, scorer.config.scoring.unknown_item, label=lambda i: f"candidates[{i}]")
    return ranking(score_states(scorer, [state], pair_user, lookup, categories, per_user=True), top_k)
