"""Kernel benchmark: every fused op's Triton kernel against its PyTorch reference.

    python -m bench.kernels [--device cuda|cpu] [--dtype bfloat16|float32] [--csv results.csv] [--reps N]
                            [--only OP_PREFIX] [--mlp-batch B] [--mlp-widths D H1 ... 1]

For each op it prints the kernel time, the reference time, their ratio (reference / kernel, so
> 1 means the kernel is faster) and the achieved bandwidth (GB/s: gather, pooling, gather-mean,
RoPE) or throughput (TFLOP/s: attention, MLP), each as a fraction of the device's peak measured in
the same run (a device-to-device copy and a large matmul). Before timing, every kernel's output is
compared with its reference's on the same inputs (``||kernel - ref|| / ||ref||``, column "rel err"). Attention
(every head shape of ATTENTION_HEADS) is also timed through torch's stock kernels: "varlen" =
torch.nn.attention.varlen.varlen_attn on the same packed q, k, v and cumulative offsets (GQA, causal as
window (-1, 0); where this torch has it), "sdpa" = scaled_dot_product_attention on the padded
(B, H, L_max, Dh) equivalent of the ragged batch (padding done outside the timed region; a key mask when
bidirectional), "sdpa-flash" = the same restricted to the flash backend (causal only: flash takes no
mask). Gathers are also timed from an int8 table (kernels/dequant_gather.py: "dequant_gather+pos",
"dequant_gather_mean", vs the float table's rows above) and from a table in pinned host memory read
zero-copy (engine.serving.placement, "... pinned"). bench/attention_configs.py sweeps the attention
kernel's tile configs. On a machine without CUDA the Triton kernels
cannot run (the interpreter measures nothing useful): only the references are timed, on small
shapes, and the output says so. Every line is labeled with the machine; `--csv` appends one row
per (op, provider) so figures from different machines sit side by side.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.serving.placement import place_table
from engine.training.studies.results_sections import append_csv, machine
from kernels import ctr_mlp, dequant_gather, gather_mean, jagged_gather, jagged_mean, rope, varlen_attention
from kernels._jagged import lengths_from_offsets, max_length, offsets_from_lengths, pad
from kernels.varlen_attention import AttentionConfig
from weights.row_codec import quantize_rows

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.10
    varlen_attn = None

# (query heads, key/value heads, head dim) of the attention cases: SmolLM2-135M (GQA), all-MiniLM-L6-v2,
# and a 128-wide GQA head (Qwen2 / Llama 3 class).
ATTENTION_HEADS = ((9, 3, 64), (12, 12, 32), (16, 4, 128))


@dataclass
class Shapes:
    """One benchmark configuration (realistic on CUDA, small enough for a minute on a CPU)."""

    dtype: torch.dtype
    sequences: int  # ragged sequences per batch
    mean_length: int  # lengths drawn uniformly from [0, 2 * mean_length]
    table_rows: int
    dim: int  # table / hidden width
    attn_heads: tuple[tuple[int, int, int], ...] = ATTENTION_HEADS
    attn_sequences: int = 64
    attn_mean_length: int = 256
    mlp_batch: int = 4096
    mlp_widths: list[int] = field(default_factory=lambda: [2688, 1024, 512, 256, 1])


CUDA_SHAPES = Shapes(torch.bfloat16, sequences=1024, mean_length=64, table_rows=500_000, dim=896)
CPU_SHAPES = Shapes(torch.float32, sequences=256, mean_length=32, table_rows=50_000, dim=384,
                    attn_heads=ATTENTION_HEADS[:1], attn_sequences=16, attn_mean_length=128, mlp_batch=512)


@dataclass
class Case:
    op: str
    shape: str
    providers: dict[str, Callable[[], object]]  # 'triton' / 'torch' / 'varlen' / 'sdpa' / 'sdpa-flash' -> thunk
    bytes: float | None = None  # memory traffic of one call (GB/s ops)
    flops: float | None = None  # useful FLOPs of one call (TFLOP/s ops)


def timings(fn: Callable[[], object], device: torch.device, reps: int) -> tuple[float, float, float]:
    """(p20, p50, p80) seconds of fn() after a warm-up call (which also compiles kernels)."""
    fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3)
    else:
        for _ in range(reps):
            began = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - began)
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return q[1], statistics.median(samples), q[7]


def relative_error(out: object, ref: object) -> float:
    """||out - ref|| / ||ref|| in fp32 (the first tensor of a tuple output: rope returns (q, k))."""
    if isinstance(out, tuple):
        return max(relative_error(o, r) for o, r in zip(out, ref))
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def measure_peaks(device: torch.device, reps: int) -> tuple[float, float]:
    """(copy bandwidth in bytes/s, matmul FLOP/s) measured on this device now: a 512 MiB
    device-to-device copy (read + write counted) and an 8192^3 bf16 matmul on CUDA; 256 MiB and
    a 2048^3 fp32 matmul on the CPU."""
    if device.type == "cuda":
        nbytes, n, dtype = 512 * 2 ** 20, 8192, torch.bfloat16
    else:
        nbytes, n, dtype = 256 * 2 ** 20, 2048, torch.float32
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = timings(lambda: dst.copy_(src), device, reps)[1]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_s = timings(lambda: a @ b, device, max(3, reps // 4))[1]
    return 2 * nbytes / copy_s, 2 * n ** 3 / mm_s


def ragged(sequences: int, mean_length: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(0, 2 * mean_length + 1, (sequences,), generator=gen)
    return offsets_from_lengths(lengths).to(device)


def build_cases(shapes: Shapes, device: torch.device) -> list[Case]:
    gen = torch.Generator().manual_seed(0)  # ragged layouts and row ids
    torch.manual_seed(0)  # tensor contents, drawn on the device
    dt, es = shapes.dtype, torch.empty(0, dtype=shapes.dtype).element_size()
    d = shapes.dim

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dt)

    offsets = ragged(shapes.sequences, shapes.mean_length, device, gen)
    total, batch = int(offsets[-1]), shapes.sequences
    longest = max_length(offsets)
    table, pos = randn(shapes.table_rows, d), randn(longest, d)
    rows = torch.randint(0, shapes.table_rows, (total,), generator=gen).to(device)
    values = randn(total, d)
    tag = f"T={total} B={batch} d={d} {str(dt).removeprefix('torch.')}"
    cases = [
        Case("jagged_gather+pos", f"N={shapes.table_rows} {tag}", {
            "triton": lambda: jagged_gather.jagged_gather_triton(table, rows, offsets=offsets, pos=pos, max_len=longest),
            "torch": lambda: jagged_gather.jagged_gather_reference(table, rows, offsets=offsets, pos=pos, max_len=longest)},
            bytes=3 * total * d * es + total * 8),
        Case("jagged_mean", tag, {
            "triton": lambda: jagged_mean.jagged_mean_triton(values, offsets),
            "torch": lambda: jagged_mean.jagged_mean_reference(values, offsets)},
            bytes=(total + batch) * d * es),
        Case("gather_mean", f"N={shapes.table_rows} {tag}", {
            "triton": lambda: gather_mean.gather_mean_triton(table, rows, offsets),
            "torch": lambda: gather_mean.gather_mean_reference(table, rows, offsets)},
            bytes=(total + batch) * d * es + total * 8),
    ]
    cases += int8_cases(table, rows, offsets, pos, longest, tag, shapes.table_rows)
    if device.type == "cuda":
        cases += pinned_cases(table, rows, offsets, pos, longest, tag, shapes.table_rows, device)

    # Attention and RoPE (first head shape): ragged batches of sequences.
    a_off = ragged(shapes.attn_sequences, shapes.attn_mean_length, device, gen)
    for h, hkv, dh in shapes.attn_heads:
        cases += attention_cases(a_off, h, hkv, dh, dt, device, rope_too=(h, hkv, dh) == shapes.attn_heads[0])

    widths, mb = shapes.mlp_widths, shapes.mlp_batch
    x = randn(mb, widths[0])
    weights = [randn(o, i) / math.sqrt(i) for i, o in zip(widths[:-1], widths[1:])]
    biases = [randn(o) for o in widths[1:]]
    cases.append(Case("ctr_mlp gelu", f"B={mb} {'-'.join(map(str, widths))} {str(dt).removeprefix('torch.')}", {
        "triton": lambda: ctr_mlp.ctr_mlp_triton(x, weights, biases, activation="gelu"),
        "torch": lambda: ctr_mlp.ctr_mlp_reference(x, weights, biases, activation="gelu")},
        flops=2 * mb * sum(i * o for i, o in zip(widths[:-1], widths[1:]))))
    return cases


def int8_cases(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, pos: torch.Tensor, longest: int,
               tag: str, num_rows: int) -> list[Case]:
    """The gathers of the float table's rows again, from its int8 copy (d + 4 bytes per row read)."""
    values, scale = quantize_rows(table.float())
    dt, d = table.dtype, table.shape[1]
    total, batch, es = rows.numel(), offsets.numel() - 1, table.element_size()
    return [
        Case("dequant_gather+pos", f"N={num_rows} int8 -> {tag}", {
            "triton": lambda: dequant_gather.dequant_gather_triton(values, scale, rows, offsets=offsets, pos=pos,
                                                                   max_len=longest, out_dtype=dt),
            "torch": lambda: dequant_gather.dequant_gather_reference(values, scale, rows, offsets=offsets, pos=pos,
                                                                     max_len=longest, out_dtype=dt)},
            bytes=total * (d + 4) + 2 * total * d * es + total * 8),
        Case("dequant_gather_mean", f"N={num_rows} int8 -> {tag}", {
            "triton": lambda: dequant_gather.dequant_gather_mean_triton(values, scale, rows, offsets, out_dtype=dt),
            "torch": lambda: dequant_gather.dequant_gather_mean_reference(values, scale, rows, offsets, out_dtype=dt)},
            bytes=total * (d + 4) + batch * d * es + total * 8),
    ]


def pinned_cases(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, pos: torch.Tensor, longest: int,
                 tag: str, num_rows: int, device: torch.device) -> list[Case]:
    """The float and int8 gathers from tables in pinned host memory, read zero-copy by the kernels
    (placement as a scorer does it when a table does not fit); the reference reads the same alias."""
    host, where = place_table(table.cpu(), device, free_bytes=0)
    values, scale = quantize_rows(table.float())
    quantized, _ = place_table(dequant_gather.QuantizedRows(values.cpu(), scale.cpu()), device, free_bytes=0)
    dt, d, total, es = table.dtype, table.shape[1], rows.numel(), table.element_size()
    return [
        Case("jagged_gather+pos pinned", f"N={num_rows} {where} {tag}", {
            "triton": lambda: jagged_gather.jagged_gather_triton(host, rows, offsets=offsets, pos=pos, max_len=longest),
            "torch": lambda: jagged_gather.jagged_gather_reference(host, rows, offsets=offsets, pos=pos,
                                                                   max_len=longest)},
            bytes=3 * total * d * es + total * 8),
        Case("dequant_gather+pos pinned", f"N={num_rows} int8 {where} -> {tag}", {
            "triton": lambda: dequant_gather.dequant_gather_triton(quantized.values, quantized.scale, rows,
                                                                   offsets=offsets, pos=pos, max_len=longest,
                                                                   out_dtype=dt),
            "torch": lambda: dequant_gather.dequant_gather_reference(quantized.values, quantized.scale, rows,
                                                                     offsets=offsets, pos=pos, max_len=longest,
                                                                     out_dtype=dt)},
            bytes=total * (d + 4) + 2 * total * d * es + total * 8),
    ]


def attention_cases(a_off: torch.Tensor, h: int, hkv: int, dh: int, dt: torch.dtype, device: torch.device, *,
                    rope_too: bool = False, config: AttentionConfig | None = None) -> list[Case]:
    """Causal and bidirectional varlen attention of (h, hkv, dh) heads on the ragged batch `a_off`: the Triton
    kernel, its reference, and torch's stock kernels (varlen_attn on the packed batch, SDPA on the padded one)."""
    a_total = int(a_off[-1])
    q, k, v = (torch.randn(a_total, n, dh, device=device, dtype=dt) for n in (h, hkv, hkv))
    lengths = lengths_from_offsets(a_off).cpu()
    a_longest = int(lengths.max())
    es = q.element_size()
    a_tag = f"T={a_total} B={a_off.numel() - 1} L_max={a_longest} H={h}/{hkv} Dh={dh} {str(dt).removeprefix('torch.')}"
    cases = []
    if rope_too:
        cos, sin = (t.to(device) for t in rope.rope_tables(a_longest, dh))
        cases.append(Case("rope(q,k)", a_tag, {
            "triton": lambda: rope.rope_triton(q, k, a_off, cos, sin, max_len=a_longest),
            "torch": lambda: rope.rope_reference(q, k, a_off, cos, sin, max_len=a_longest)},
            bytes=2 * a_total * (h + hkv) * dh * es + 2 * a_total * dh * 4))
    qp, mask = pad(q, a_off)
    kp, _ = pad(k, a_off)
    vp, _ = pad(v, a_off)
    qp, kp, vp = qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2)
    key_mask = mask[:, None, None, :]
    cu = a_off.to(torch.int32)
    for causal in (True, False):
        pairs = float((lengths * (lengths + 1) // 2).sum()) if causal else float((lengths ** 2).sum())
        providers = {
            "triton": lambda c=causal: varlen_attention.varlen_attention_triton(q, k, v, a_off, causal=c,
                                                                               max_len=a_longest, config=config),
            "torch": lambda c=causal: varlen_attention.varlen_attention_reference(q, k, v, a_off, causal=c,
                                                                                 max_len=a_longest)}
        if varlen_attn is not None and device.type == "cuda" and dt != torch.float32:  # flash: 16-bit only
            providers["varlen"] = lambda c=causal: varlen_attn(q, k, v, cu, cu, a_longest, a_longest,
                                                               window_size=(-1, 0) if c else (-1, -1),
                                                               enable_gqa=hkv != h)
        providers["sdpa"] = lambda c=causal: F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=None if c else key_mask, is_causal=c, enable_gqa=hkv != h)
        if causal and device.type == "cuda":
            providers["sdpa-flash"] = lambda: _flash_sdpa(qp, kp, vp, hkv != h)
        cases.append(Case(f"varlen_attention {'causal' if causal else 'bidir'}", a_tag, providers,
                          flops=4 * h * dh * pairs))
    return cases


def _flash_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per case (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="element type (default bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--only", default="", help="time only the ops whose name starts with this")
    parser.add_argument("--mlp-batch", type=int, default=None, help="rows of the CTR MLP's input")
    parser.add_argument("--mlp-widths", type=int, nargs="+", default=None, help="the CTR MLP's widths, input first")
    parser.add_argument("--csv", type=Path, default=None, help="append one row per (op, provider) to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    reps = args.reps or (20 if on_cuda else 3)
    label = machine()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"machine: {label}")
    peak_bw, peak_flops = measure_peaks(device, reps)
    print(f"measured peak on {device.type}: copy {peak_bw / 1e9:.0f} GB/s, "
          f"matmul {peak_flops / 1e12:.2f} TFLOP/s ({'bf16' if on_cuda else 'fp32'})")
    shapes = CUDA_SHAPES if on_cuda else CPU_SHAPES
    if args.dtype:
        shapes = dataclasses.replace(shapes, dtype=getattr(torch, args.dtype))
    if args.mlp_batch:
        shapes = dataclasses.replace(shapes, mlp_batch=args.mlp_batch)
    if args.mlp_widths:
        shapes = dataclasses.replace(shapes, mlp_widths=args.mlp_widths)
    if not on_cuda:
        print("Triton kernels need CUDA: timing only the PyTorch references, on small CPU shapes")
    providers = ("triton", "torch", "varlen", "sdpa", "sdpa-flash") if on_cuda else ("torch", "sdpa")
    rows = []
    header = (f"{'op':<27} {'provider':<10} {'ms':>9} {'vs kernel':>9} {'achieved':>17} {'of peak':>7} "
              f"{'rel err':>8}  shape")
    print(header)
    print("-" * len(header))
    for case in (c for c in build_cases(shapes, device) if c.op.startswith(args.only)):
        errors = provider_errors(case, providers) if on_cuda else {}
        results = {}
        for provider, fn in case.providers.items():
            if provider not in providers:
                continue
            try:
                results[provider] = timings(fn, device, reps)
            except Exception as err:  # noqa: BLE001 - a stock kernel this build lacks is a line, not the end of the run
                print(f"{case.op:<27} {provider:<10} failed: {type(err).__name__}: {str(err)[:120]}")
        kernel_s = results.get("triton", (None, None, None))[1]
        for provider, (p20, p50, p80) in results.items():
            if case.bytes is not None:
                rate, unit, frac = case.bytes / p50 / 1e9, "GB/s", case.bytes / p50 / peak_bw
            else:
                rate, unit, frac = case.flops / p50 / 1e12, "TFLOP/s", case.flops / p50 / peak_flops
            ratio = f"{p50 / kernel_s:.2f}x" if kernel_s else "-"
            error = errors.get(provider)
            checked = f"{error:.1e}" if error is not None else "-"
            print(f"{case.op:<27} {provider:<10} {p50 * 1e3:>9.3f} {ratio:>9} {rate:>9.3g} {unit:<7}"
                  f"{frac:>7.1%} {checked:>8}  {case.shape}")
            rows.append({"kernel": case.op, "provider": provider, "shape": case.shape, "p20_ms": p20 * 1e3,
                         "p50_ms": p50 * 1e3, "p80_ms": p80 * 1e3, "achieved": rate, "unit": unit,
                         "fraction_of_peak": frac, "rel_error": error,
                         "machine": label, "timestamp": started})
    if args.csv:
        append_csv(args.csv, list(rows[0]), rows)
        print(f"appended {len(rows)} rows to {args.csv}")


def provider_errors(case: Case, providers: tuple[str, ...]) -> dict[str, float]:
    """||out - ref|| / ||ref|| of every provider whose output has the reference's (packed) layout."""
    ref = case.providers["torch"]()
    errors = {}
    for provider, fn in case.providers.items():
        if provider == "torch" or provider not in providers:
            continue
        try:
            out = fn()
        except Exception:  # noqa: BLE001 - reported when timed
            continue
        if isinstance(out, tuple) == isinstance(ref, tuple) and (isinstance(out, tuple) or out.shape == ref.shape):
            errors[provider] = relative_error(out, ref)
    return errors


if __name__ == "__main__":
    main()
