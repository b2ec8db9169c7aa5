"""Ragged ("jagged") layout shared by every op: values packed as (T, ...) with
offsets (B+1,) int64, cumulative, offsets[0] = 0, offsets[-1] = T. Length 0 is legal.

Two kinds of checks. `check_offsets` / `check_rows` read the VALUES (first and last offset,
monotonicity, id range): they are the API boundary's, run once on host tensors before anything
moves to the device (`PackedBatch.validate`, `BAHEScorer.score_ids`, the encoders' packing).
`check_offsets_layout` / `check_rows_layout` look only at dtype and shape, never at a value: the
launchers and references call those, so a launch costs no device -> host read. The caller passes
`max_len` (the longest sequence, known on the host at the boundary) where an op needs it."""
from __future__ import annotations

import numbers

import torch


def check_offsets(offsets: torch.Tensor, total: int, name: str = "offsets") -> None:
    """Raise ValueError unless `offsets` is a 1-D int64 cumulative array from 0 to `total`.
    Reads the values: the API boundary's check, on host tensors (see the module docstring); TypeError for a
    tensor without values to read (sparse, nested, meta)."""
    check_dense(offsets, name)
    check_offsets_layout(offsets, name)
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0:
        raise ValueError(f"{name}[0] must be 0, got {first}")
    if last != total:
        raise ValueError(f"{name}[-1] must equal the number of packed elements {total}, got {last}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing (lengths >= 0)")


def check_dense(tensor: object, name: str) -> None:
    """TypeError unless `tensor` is a dense (strided) torch.Tensor that holds values: not sparse, nested or
    on the meta device. For the boundary's checks, which read values next (launchers skip it)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided or tensor.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {tensor.layout}")
    if tensor.is_meta:
        raise TypeError(f"{name} is on the meta device: it holds no values to check or score")


def check_offsets_layout(offsets: torch.Tensor, name: str = "offsets") -> None:
    """Raise unless `offsets` is a 1-D int64 tensor of B+1 >= 1 entries (dtype and shape only:
    no value is read, so no device sync)."""
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{name} must have shape (B+1,) with B >= 0, got {tuple(offsets.shape)}")


def check_rows_layout(rows: torch.Tensor, name: str = "rows") -> None:
    """Raise unless `rows` is a 1-D int64 tensor (dtype and shape only: no value is read)."""
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(rows).__name__}")
    if rows.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"{name} must be 1-D (T,), got shape {tuple(rows.shape)}")


def check_max_len(max_len: int, offsets: torch.Tensor | None = None, total: int | None = None,
                  name: str = "max_len") -> int:
    """`max_len` must be a host int >= 0 bounding the longest sequence, never a tensor. With the
    offsets (B+1,) and the packed length T, also the host-side consistency B * max_len >= T
    (shapes only: no value is read). -> int(max_len)."""
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 0:
        raise TypeError(f"{name} must be a host int >= 0 (the longest sequence), got {max_len!r}")
    if offsets is not None and total is not None and (offsets.numel() - 1) * int(max_len) < total:
        raise ValueError(f"{name} {int(max_len)} is shorter than the longest sequence: {offsets.numel() - 1} "
                         f"sequences of at most {int(max_len)} cannot hold {total} packed elements")
    return int(max_len)


def check_rows(rows: torch.Tensor, num_rows: int, name: str = "rows") -> None:
    """Raise unless `rows` is a 1-D int64 tensor of ids in [0, num_rows): checked on the host
    at the API boundary, before anything moves to the device, so a bad id never reaches a kernel. TypeError
    for a tensor without values to read (sparse, nested, meta)."""
    check_dense(rows, name)
    check_rows_layout(rows, name)
    if rows.numel() == 0:
        return
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= num_rows:
        bad = low if low < 0 else high
        raise IndexError(f"{name} holds id {bad}, outside the table's {num_rows} rows [0, {num_rows})")


def lengths_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """(B+1,) cumulative offsets -> (B,) lengths."""
    return offsets[1:] - offsets[:-1]


def max_length(offsets: torch.Tensor) -> int:
    """Length of the longest sequence of (B+1,) cumulative offsets; 0 when B = 0. Reads the
    values: for host offsets at the boundary (the result is the `max_len` the ops take)."""
    return int(lengths_from_offsets(offsets).max()) if offsets.numel() > 1 else 0


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """(B,) lengths -> (B+1,) int64 cumulative offsets starting at 0."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths.to(torch.int64), dim=0, out=offsets[1:])
    return offsets


def segment_ids(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) int64: index of the sequence each packed element belongs to."""
    lengths = lengths_from_offsets(offsets)
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=total
    )


def positions_in_sequence(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) int64: position of each packed element inside its own sequence (0-based)."""
    seg = segment_ids(offsets, total)
    return torch.arange(total, device=offsets.device) - offsets[seg]


def pad(values: torch.Tensor, offsets: torch.Tensor, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, ...) packed -> (B, L, ...) right-padded with zeros, and a (B, L) bool mask of real elements."""
    lengths = lengths_from_offsets(offsets)
    batch = lengths.numel()
    if max_len is None:
        max_len = int(lengths.max()) if batch else 0
    total = values.shape[0]
    padded = values.new_zeros((batch, max_len) + tuple(values.shape[1:]))
    mask = torch.arange(max_len, device=values.device)[None, :] < lengths[:, None]
    if total:
        seg = segment_ids(offsets, total)
        pos = torch.arange(total, device=values.device) - offsets[seg]
        padded[seg, pos] = values
    return padded, mask
