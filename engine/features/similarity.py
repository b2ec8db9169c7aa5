"""Similarity-weighted counts: how much of each named sequence resembles the target item.

For a target item with ABE row v and a user's sequence s with rows r_j, W_s(tau) = sum_j exp((cos(v, r_j) - 1) / tau):
a soft count of the sequence's behaviors like the item (1 per identical text, ~0 for unrelated ones; a small tau
counts only near-duplicates, a larger one whole neighbourhoods). Across sequences it gives what a classic CTR
model's "user's like-rate on the target's category" gives, without any category: the share of similar past
behaviors that are likes (MovieLens: W_liked / W_watched). The rows are the frozen ABE rows (the behavior and
item tables), so the features are fixed functions of the inputs; the head learns what to make of them.

One implementation, `range_soft_counts`, serves every path: each target reads, per sequence, a range of
behaviors (start, length); the model's forward passes each sequence whole (`BAHEModel.similar`), timeline
training each target's prefix (`engine.training.loops.timeline`), serving each (user, candidate) pair's user
sequences (`engine.serving.towers.pair_similar`). Where targets share behaviors (a user's K candidates, a
user's timeline targets) the cosines come from one (targets x rows) product; where each behavior has one
target (the forward), from one row-wise dot product, without the product's other entries.
"""
from __future__ import annotations

import torch

__all__ = ["unit_rows", "similarity_weights", "segment_sums", "range_soft_counts", "similarity_features",
           "similarity_feature_names"]


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """(P, d) -> float64 rows of norm 1 (a zero row stays zero: cosine 0 with anything)."""
    x = x.double()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def similarity_weights(cos: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """(P,) cosines -> (P, k) float64 exp((cos - 1) / tau) per temperature: 1 for the same direction."""
    shifted = cos.double().clamp(-1.0, 1.0) - 1.0  # temperatures stay host scalars: no copy to the device
    return torch.stack([torch.exp(shifted / tau) for tau in temperatures], dim=1)


def segment_sums(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """values (P, k), offsets (K+1,) of K contiguous segments -> (K, k) float64 sums, through a cumulative sum
    (deterministic on every device, no atomics, no host read)."""
    cumulative = torch.cat([values.new_zeros(1, values.shape[1], dtype=torch.float64),
                            torch.cumsum(values.double(), dim=0)])
    return cumulative[offsets[1:]] - cumulative[offsets[:-1]]


def range_soft_counts(items: torch.Tensor, behaviors: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                      pairs: int, temperatures: tuple[float, ...], *, rows: torch.Tensor | None = None,
                      shared: bool = True) -> torch.Tensor:
    """(P, n, k) float64 soft counts: target p's sequence s reads behaviors starts[p, s] + j, j < lengths[p, s].
    items (P, d), behaviors (R, d): unit rows (`unit_rows`); starts, lengths (P, n) int64 on their device;
    pairs: lengths.sum(), a host int (no device read); rows (T,) int64: behavior position -> row of `behaviors`
    (None: position i is row i). shared: cosines from one (P, R) product (targets that read the same rows), else
    one dot product per (target, behavior) pair."""
    (targets, n), device = starts.shape, starts.device
    starts, lengths = starts.reshape(-1), lengths.reshape(-1)
    pair_offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, dim=0)])
    owner = torch.repeat_interleave(torch.arange(starts.numel(), device=device), lengths, output_size=pairs)
    position = starts[owner] + torch.arange(pairs, device=device) - pair_offsets[owner]
    row = position if rows is None else rows[position]
    if shared:
        cos = (items @ behaviors.T).reshape(-1)[(owner // n) * behaviors.shape[0] + row]
    else:
        cos = (behaviors[row] * items[owner // n]).sum(dim=1)
    return segment_sums(similarity_weights(cos, temperatures), pair_offsets).view(targets, n, len(temperatures))


def similarity_features(sums: torch.Tensor) -> torch.Tensor:
    """(B, S, k) soft counts -> (B, 2 S k) float32: log1p(W) (volume) and (W + 1) / (max_s W + 2), the share of
    each sequence among the similar behaviors, Laplace-smoothed like the count features' shares."""
    share = (sums + 1.0) / (sums.amax(dim=1, keepdim=True) + 2.0)
    return torch.cat([torch.log1p(sums).flatten(1), share.flatten(1)], dim=1).float()


def similarity_feature_names(sequence_names: tuple[str, ...], temperatures: tuple[float, ...]) -> list[str]:
    """Column names of `similarity_features`, in order."""
    return [f"similar_{kind}_{name}_t{tau:g}" for kind in ("log1p", "share") for name in sequence_names
            for tau in temperatures]
