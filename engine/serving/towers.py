"""The scorer's compute between parsed rows and logits: the user tower once per distinct user (through the
user-vector LRU), item vectors (stored; the tower on the fly for rows encoded in this call), the count
features, and the head, over arbitrary (user, item) pairs or over each user's candidate list with the user
folded into the head's first layer (`CTRHead.forward_folded`), and the similarity-weighted counts of each
pair (`engine.features.similarity`, one (pairs x behaviors) product of unit ABE rows per distinct user)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.serving.item_vectors import weights_version
from engine.model.bahe_model import BAHEModel, gather_rows
from engine.features.similarity import similarity_weights, unit_rows
from engine.features.side_features import count_features
from engine.serving.user_cache import UserStateCache, user_key

HEAD_BATCH = 8192  # (user, item) pairs per head call


def _device(model: BAHEModel) -> torch.device:
    return model.empty_sequence.device


def user_states(model: BAHEModel, behavior_table: torch.Tensor, rows: np.ndarray, offsets: np.ndarray,
                extra: torch.Tensor | None, cache: UserStateCache, batch_size: int) -> torch.Tensor:
    """(U, n, d) pooled states of the U users packed in rows (T,) / offsets (U*n+1,), user-major: from the
    LRU where cached (users whose behaviors are all table rows), the rest through the upper layers,
    batch_size users per forward."""
    n, device = model.num_sequences, _device(model)
    users, table_size = (offsets.size - 1) // n, behavior_table.shape[0]
    bounds = offsets[::n]
    keys: list[bytes | None] = [None] * users
    if cache.max_bytes:
        keys = [user_key(rows[bounds[u]:bounds[u + 1]], np.diff(offsets[u * n:(u + 1) * n + 1]))
                if extra is None or not (rows[bounds[u]:bounds[u + 1]] >= table_size).any() else None
                for u in range(users)]
    owner = (weights_version(model), model.compute_dtype)
    cached = cache.get_many(keys, owner)
    out = torch.empty(users, n, model.upper.hidden_size, dtype=model.compute_dtype, device=device)
    todo = [u for u in range(users) if cached[u] is None]
    for u in range(users):
        if cached[u] is not None:
            out[u] = cached[u]
    for lo in range(0, len(todo), batch_size):
        chunk = np.asarray(todo[lo:lo + batch_size])
        seq = (chunk[:, None] * n + np.arange(n)[None, :]).ravel()  # the chunk's sequences, in order
        lengths = offsets[seq + 1] - offsets[seq]
        picked = (np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in seq]) if lengths.sum()
                  else np.empty(0, dtype=np.int64))
        longest = max(int(lengths.max()), 1)  # on the host: the forward reads no device value
        states = model.user_states(behavior_table, torch.from_numpy(rows[picked]).to(device),
                                   torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).to(device), longest,
                                   extra)
        out[torch.from_numpy(chunk).to(device)] = states
        cache.put_many([keys[u] for u in chunk], list(states), owner)
    return out


def item_states(model: BAHEModel, vectors: torch.Tensor, item_rows: np.ndarray,
                extra: torch.Tensor | None) -> torch.Tensor:
    """(P, d) item-tower outputs: stored vectors (N, d) for rows < N, the tower on the fly for the rows encoded
    in this call (ids >= N index `extra`)."""
    device, n = _device(model), vectors.shape[0]
    known = item_rows < n
    out = vectors[torch.from_numpy(np.where(known, item_rows, 0))].to(device, model.compute_dtype)
    if not known.all():
        fresh = model.item_states(extra, torch.arange(extra.shape[0], device=device))
        out[torch.from_numpy(~known).to(device)] = fresh[torch.from_numpy(item_rows[~known] - n).to(device)]
    return out


def dense_features(model: BAHEModel, user_counts: np.ndarray, recent: np.ndarray | None,
                   item_rows: np.ndarray) -> np.ndarray | None:
    """(P, F) count features of pairs: the user's history lengths (P, n), the recent shares of its sequences,
    the item's stored training-log counts (zero for items the model was not trained with)."""
    if not model.config.count_features:
        return None
    stored = model.item_counts.cpu().numpy()
    known = item_rows < stored.shape[0]
    item_counts = np.zeros((item_rows.size, stored.shape[1]), dtype=np.int64)
    item_counts[known] = stored[item_rows[known]]
    return count_features(user_counts, item_counts, recent)


def pair_similar(model: BAHEModel, behavior_table: torch.Tensor, rows: np.ndarray, offsets: np.ndarray,
                 behavior_extra: torch.Tensor | None, item_table: torch.Tensor, item_rows: np.ndarray,
                 item_extra: torch.Tensor | None, pair_user: np.ndarray) -> torch.Tensor | None:
    """(P, n, k) soft counts of each pair's user sequences like its item, as `BAHEModel.similar` computes them
    for one pair at a time; None for a model without them."""
    temperatures = model.config.similarity_temperatures
    if not temperatures:
        return None
    device, n, k = _device(model), model.num_sequences, len(temperatures)
    behaviors = unit_rows(gather_rows(behavior_table, behavior_extra, torch.from_numpy(rows).to(device), None, None, None,
                                  torch.float32))
    items = unit_rows(gather_rows(item_table, item_extra, torch.from_numpy(item_rows).to(device), None, None, None,
                              torch.float32))
    out = torch.zeros(item_rows.size, n, k, dtype=torch.float64, device=device)
    order = np.argsort(pair_user, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(pair_user, minlength=(offsets.size - 1) // n))])
    for u in np.flatnonzero(np.diff(bounds)):
        pairs = torch.from_numpy(order[bounds[u]:bounds[u + 1]]).to(device)
        sequence_offsets = offsets[u * n:(u + 1) * n + 1]
        start, stop = int(sequence_offsets[0]), int(sequence_offsets[-1])
        cos = items[pairs] @ behaviors[start:stop].T  # (pairs, the user's behaviors)
        weights = similarity_weights(cos.reshape(-1), temperatures).view(pairs.numel(), stop - start, k)
        cumulative = torch.cat([weights.new_zeros(pairs.numel(), 1, k), torch.cumsum(weights, dim=1)], dim=1)
        local = torch.from_numpy(sequence_offsets - start).to(device)
        out[pairs] = cumulative[:, local[1:]] - cumulative[:, local[:-1]]
    return out


def _tensor(array: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array).to(device)


def _side(model: BAHEModel, item_rows: np.ndarray, dense: np.ndarray | None, similar: torch.Tensor | None,
          categories: np.ndarray | None) -> list[torch.Tensor]:
    device = _device(model)
    return model.side(torch.from_numpy(item_rows).to(device), _tensor(dense, device), model.compute_dtype, similar,
                      _tensor(categories, device))


def pair_logits(model: BAHEModel, user: torch.Tensor, item: torch.Tensor, pair_user: np.ndarray,
                item_rows: np.ndarray, dense: np.ndarray | None, similar: torch.Tensor | None = None,
                categories: np.ndarray | None = None) -> torch.Tensor:
    """(P,) logits of pairs (user[pair_user[p]], item[p]): the head over materialized pair features."""
    out = []
    for lo in range(0, item_rows.size, HEAD_BATCH):
        hi = min(lo + HEAD_BATCH, item_rows.size)
        users = user[torch.from_numpy(pair_user[lo:hi]).to(user.device)]
        out.append(model.logits(users, item[lo:hi], torch.from_numpy(item_rows[lo:hi]).to(user.device),
                                None if dense is None else torch.from_numpy(dense[lo:hi]).to(user.device),
                                None if similar is None else similar[lo:hi],
                                _tensor(None if categories is None else categories[lo:hi], user.device)))
    return torch.cat(out) if out else torch.empty(0)


def per_user_logits(model: BAHEModel, user: torch.Tensor, item: torch.Tensor, pair_user: np.ndarray,
                    item_rows: np.ndarray, dense: np.ndarray | None, similar: torch.Tensor | None = None,
                    categories: np.ndarray | None = None) -> torch.Tensor:
    """`pair_logits` for pairs laid out user by user (pair_user non-decreasing): each user's candidates in one
    head call with the user folded into the first layer, so the K candidates cost a (K, d) product instead of
    a (K, (2n+1) d) one. Same function; rounding differs from `pair_logits` (~1e-6)."""
    out = []
    bounds = np.concatenate([[0], np.cumsum(np.bincount(pair_user, minlength=user.shape[0]))])
    for u in range(user.shape[0]):
        lo, hi = int(bounds[u]), int(bounds[u + 1])
        if lo == hi:
            continue
        cand = item[lo:hi]
        cos = (F.cosine_similarity(user[u][None], cand[:, None, :], dim=-1) if model.config.similarity_features
               else None)
        side = _side(model, item_rows[lo:hi], None if dense is None else dense[lo:hi],
                     None if similar is None else similar[lo:hi], None if categories is None else categories[lo:hi])
        out.append(model.head.forward_folded(user[u], cand, cos, torch.cat(side, 1) if side else None))
    return torch.cat(out) if out else torch.empty(0)
