"""The whole BAHE model forward, Triton kernels vs the PyTorch references, side by side on one device.

    python -m bench.backends [--device cuda] [--dtype bfloat16] [--users 256] [--ms 16 128 1024] [--reps 20] [--compile]

Upper layers of the real models' shapes (all-MiniLM-L6-v2: 3 BERT layers, d = 384, 12 heads;
SmolLM2-135M: 3 Llama layers, d = 576, 9/3 heads), random weights (the timing does not depend on
their values), the full CTR head, n = 3 sequences per user with lengths drawn from [0, 2M] (mean M; min(--users, 32768 // M) users,
so the references' padded (B, H, L, L) attention scores fit in memory),
and behavior / item tables of 100,000 / 10,000 rows on the device. Prints, per (model, M), the
median forward time of each backend, their ratio, the Triton forward replayed as a CUDA graph
(launch overhead gone), and the relative difference of the logits. Each row interleaves the
backends repetition by repetition. The PyTorch side is the best stock forward this project has: attention
through scaled_dot_product_attention (flash / memory-efficient kernels on padded length buckets), and with
--compile also that forward under torch.compile ("compiled" column; "n/a" where compiling fails, with the
reason printed; its compile time is not timed).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import BertConfig, LlamaConfig

from engine.backbone.layers import BERT_LAYER_NAMES, DECODER_LAYER_NAMES
from engine.backbone.split import UpperEncoder
from engine.config import ModelConfig
from engine.model.bahe_model import BAHEModel, PackedBatch
from engine.training.studies.results_sections import machine
from kernels import ops

SHAPES = {
    "minilm": (BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6),
               BERT_LAYER_NAMES),
    "smollm2": (LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                            num_hidden_layers=30, max_position_embeddings=8192, rms_norm_eps=1e-5,
                            rope_theta=100000.0), DECODER_LAYER_NAMES),
}
UPPER_LAYERS = 3
BEHAVIOR_ROWS, ITEM_ROWS = 100_000, 10_000


def build_model(name: str, device: torch.device, dtype: torch.dtype, max_behaviors: int) -> BAHEModel:
    """A random-weight BAHE model with `name`'s upper-layer shapes (all linears with a bias for BERT)."""
    config, layer_names = SHAPES[name]
    biases = set(layer_names) if name == "minilm" else set()
    upper = UpperEncoder(config, config.num_hidden_layers - UPPER_LAYERS, [biases] * UPPER_LAYERS, causal=True)
    model = BAHEModel(upper, ModelConfig(max_behaviors=max_behaviors), num_items=ITEM_ROWS)
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: perturb every tensor
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.to(device, dtype).eval()


def random_batch(users: int, num_sequences: int, mean_m: int, seed: int) -> PackedBatch:
    """Host-validated: lengths uniform in [0, 2 mean_m], rows and items uniform, count features in [0, 1)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 2 * mean_m + 1, size=users * num_sequences)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    batch = PackedBatch(torch.from_numpy(rng.integers(0, BEHAVIOR_ROWS, size=int(offsets[-1]))),
                        torch.from_numpy(offsets), torch.from_numpy(rng.integers(0, ITEM_ROWS, size=users)),
                        dense=torch.from_numpy(rng.random((users, 5 * num_sequences), dtype=np.float32)))
    batch.validate(num_sequences, BEHAVIOR_ROWS, ITEM_ROWS)
    return batch


def event_ms(fn, device: torch.device) -> float:
    if device.type != "cuda":
        began = time.perf_counter()
        fn()
        return (time.perf_counter() - began) * 1e3
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop)


def captured(forward, device: torch.device):
    """forward captured in a CUDA graph (after a warm-up on a side stream) -> a replay thunk."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return graph.replay


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--ms", type=int, nargs="+", default=[16, 128, 1024], help="mean behaviors per sequence")
    parser.add_argument("--models", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time the PyTorch forward under torch.compile")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    on_cuda = device.type == "cuda"
    print(f"machine: {machine()}; {args.dtype}, 3 sequences per user, {UPPER_LAYERS} upper layers")
    header = (f"{'model':<8} {'M':>5} {'users':>5} {'behaviors':>9} {'torch ms':>9} {'triton ms':>9} {'ratio':>6} "
              f"{'graph ms':>9} {'rel diff':>8}" + (f" {'compiled ms':>11} {'vs triton':>9}" if args.compile else ""))
    print(header)
    print("-" * len(header))
    for name in args.models:
        for mean_m in args.ms:
            model = build_model(name, device, dtype, 2 * mean_m)
            d = model.upper.hidden_size
            behaviors = torch.randn(BEHAVIOR_ROWS, d, device=device, dtype=dtype)
            items = torch.randn(ITEM_ROWS, d, device=device, dtype=dtype)
            users = min(args.users, 32768 // mean_m)
            batch = random_batch(users, model.num_sequences, mean_m, seed=mean_m).to(device)
            outputs, times = {}, {"torch": [], "triton": []}
            forwards = {"torch": model, "triton": model}
            if args.compile:
                times["compiled"], forwards["compiled"] = [], torch.compile(model)
            with torch.inference_mode():
                for backend in list(times):  # warm-up: compiles kernels, fills rotary tables
                    with ops.use_backend("torch" if backend == "compiled" else backend):
                        try:
                            outputs[backend] = forwards[backend](behaviors, items, batch).float()
                        except Exception as err:  # noqa: BLE001 - torch.compile where it works
                            if backend != "compiled":
                                raise
                            print(f"  {name} M={mean_m}: torch.compile failed ({type(err).__name__}: {str(err)[:100]})")
                            del times[backend]
                for _ in range(args.reps):
                    for backend, samples in times.items():
                        with ops.use_backend("torch" if backend == "compiled" else backend):
                            samples.append(event_ms(lambda: forwards[backend](behaviors, items, batch), device))
                graph_ms = float("nan")
                if on_cuda:
                    with ops.use_backend("triton"):
                        replay = captured(lambda: model(behaviors, items, batch), device)
                    graph_ms = statistics.median(event_ms(replay, device) for _ in range(args.reps))
            torch_ms, triton_ms = (statistics.median(times[b]) for b in ("torch", "triton"))
            diff = float((outputs["triton"] - outputs["torch"]).norm() / outputs["torch"].norm())
            extra = ""
            if args.compile:
                compiled_ms = statistics.median(times["compiled"]) if "compiled" in times else float("nan")
                extra = f" {compiled_ms:>11.2f} {compiled_ms / triton_ms:>8.2f}x"
            print(f"{name:<8} {mean_m:>5} {users:>5} {batch.behavior_rows.numel():>9} {torch_ms:>9.2f} {triton_ms:>9.2f} "
                  f"{torch_ms / triton_ms:>5.2f}x {graph_ms:>9.2f} {diff:>8.1e}{extra}")
            del model, behaviors, items, batch
            if on_cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
