"""The scorer's device math between the request's rows (already on the device, `ScoringPipeline.score`) and
logits, as pure functions of tensors: item vectors (stored; the tower on the fly for rows encoded in this call),
the similarity-weighted counts of each (user, item) pair (`engine.features.similarity.range_soft_counts`, its
pair form, one product per group of users), and the head over arbitrary pairs or over each user's candidate
list with the users folded into the head's first layer (`CTRHead.forward_folded_users`). Host ints that
shape the work (group bounds, the widest candidate list) come from the host plan, so nothing here reads a
device value back."""
from __future__ import annotations

import numpy as np
import torch

from engine.features.similarity import range_soft_counts, unit_rows
from engine.model.bahe_model import BAHEModel, gather_rows
from engine.model.head import head_features

HEAD_BATCH = 8192  # (user, item) pairs per head call


def item_states(model: BAHEModel, vectors: torch.Tensor, item_rows: torch.Tensor, extra: torch.Tensor | None,
                fresh_pairs: torch.Tensor | None, fresh_rows: torch.Tensor | None) -> torch.Tensor:
    """(P, d) item-tower outputs: stored vectors (N, d) for rows < N, the tower on the fly for the pairs
    `fresh_pairs` whose rows were encoded in this call (`fresh_rows` index `extra`)."""
    known = torch.where(item_rows < vectors.shape[0], item_rows, torch.zeros_like(item_rows))
    out = vectors[known].to(model.compute_dtype)
    if fresh_pairs is not None:
        tower = model.item_states(extra, torch.arange(extra.shape[0], device=extra.device))
        out[fresh_pairs] = tower[fresh_rows]
    return out


def similarity_plan(offsets: np.ndarray, pair_user: np.ndarray, n: int, block: int,
                    groups: list[tuple[int, int, int, int, int]]) -> dict[str, np.ndarray]:
    """Host plan of `pair_similar`: the pairs in user order (`similarity_pairs`), each one's sequences' starts and
    lengths in the packed rows, and (appended to `groups`) groups of consecutive users whose (pairs x behaviors)
    cosines stay under `block`: (first pair, end pair, first behavior, end behavior, (pair, behavior) count)."""
    order = np.argsort(pair_user, kind="stable")
    users = pair_user[order]
    sequences = users[:, None] * n + np.arange(n)[None, :]
    starts, lengths = offsets[sequences], offsets[sequences + 1] - offsets[sequences]
    per_user = np.bincount(users, minlength=(offsets.size - 1) // n)
    pair_bounds = np.concatenate([[0], np.cumsum(per_user)])
    lo = 0
    present = np.flatnonzero(per_user)
    while lo < present.size:
        hi = lo + 1  # at least one user per group
        while hi < present.size and ((pair_bounds[present[hi] + 1] - pair_bounds[present[lo]])
                                     * (offsets[(present[hi] + 1) * n] - offsets[present[lo] * n])) <= block:
            hi += 1
        first, last = present[lo], present[hi - 1]
        p0, p1 = int(pair_bounds[first]), int(pair_bounds[last + 1])
        b0, b1 = int(offsets[first * n]), int(offsets[(last + 1) * n])
        groups.append((p0, p1, b0, b1, int(lengths[p0:p1].sum())))
        lo = hi
    return {"similarity_pairs": order, "similarity_starts": starts, "similarity_lengths": lengths}


def pair_similar(model: BAHEModel, behavior_table: torch.Tensor, item_table: torch.Tensor, dev: dict,
                 groups: list[tuple[int, int, int, int, int]], pairs: int) -> torch.Tensor | None:
    """(P, n, k) soft counts of each pair's user sequences like its item (`range_soft_counts`, the function the
    model's forward and timeline training call), from the fp32 ABE rows; None for a model without them."""
    temperatures = model.config.similarity_temperatures
    if not temperatures:
        return None
    device = dev["item_rows"].device
    out = torch.zeros(pairs, model.num_sequences, len(temperatures), dtype=torch.float64, device=device)
    if not groups:
        return out
    behaviors = unit_rows(gather_rows(behavior_table, dev["behavior_extra"], dev["behavior_rows"], None, None, None,
                                      torch.float32))
    items = unit_rows(gather_rows(item_table, dev["item_extra"], dev["item_rows"], None, None, None, torch.float32))
    order, starts, lengths = dev["similarity_pairs"], dev["similarity_starts"], dev["similarity_lengths"]
    for p0, p1, b0, b1, count in groups:
        which = order[p0:p1]
        out[which] = range_soft_counts(items[which], behaviors[b0:b1], starts[p0:p1] - b0, lengths[p0:p1], count,
                                       temperatures)
    return out


def pair_logits(model: BAHEModel, user: torch.Tensor, item: torch.Tensor, pair_user: torch.Tensor,
                side: list[torch.Tensor]) -> torch.Tensor:
    """(P,) logits of pairs (user[pair_user[p]], item[p]): the head over materialized pair features (`side`: the
    model's side columns of the pairs, `SideInputs`)."""
    out, pairs = [], item.shape[0]
    for lo in range(0, pairs, HEAD_BATCH):
        hi = min(lo + HEAD_BATCH, pairs)
        text = head_features(user[pair_user[lo:hi]], item[lo:hi], model.config.similarity_features)
        out.append(model.head(torch.cat([text, *(s[lo:hi] for s in side)], dim=1)))
    return torch.cat(out) if out else torch.empty(0, device=item.device)


def per_user_logits(model: BAHEModel, user: torch.Tensor, item: torch.Tensor, pair_user: torch.Tensor,
                    slot: torch.Tensor, widest: int, side: list[torch.Tensor]) -> torch.Tensor:
    """`pair_logits` for pairs laid out user by user: every user's candidates in one batched head call with the
    users folded into the first layer, so K candidates cost a (K, d) product instead of a (K, (2n+1) d) one.
    Same function; rounding differs from `pair_logits` (~1e-6)."""
    if item.shape[0] == 0:
        return torch.empty(0, device=item.device)
    cos = (torch.nn.functional.cosine_similarity(user[pair_user], item[:, None, :], dim=-1)
           if model.config.similarity_features else None)
    return model.head.forward_folded_users(user, item, pair_user, slot, widest, cos,
                                           torch.cat(side, 1) if side else None)
