"""Write the GPU checks' section of bench/RESULTS.md from the logs bench/gpu_checks.sh left in OUT_DIR.

    python -m bench.gpu_report OUT_DIR [--results-md bench/RESULTS.md] [--seconds S]

One section per device name (`<!-- bench:gpu:<device> -->`), replaced on the next run on that device: the
device line (nvidia-smi), the versions, then every step's command and output as the script ran it (a step
that hit its time limit says so). The figures are copied, not summarized: reading them is the reader's work.
"""
from __future__ import annotations

import argparse
import datetime
import re
from pathlib import Path

from engine.training.studies.results_sections import write_section

# (log file stem, title) in the order gpu_checks.sh runs them
STEPS = (("gpu_tests", "CUDA tests"), ("kernels_bf16", "Every kernel against its reference and the stock kernels, bf16"),
         ("kernels_fp32", "The same, fp32"), ("attention_configs", "Attention tile configs, bf16"),
         ("backends_bf16", "Whole forward: Triton vs best PyTorch (SDPA, torch.compile), bf16"),
         ("backends_fp32", "Whole forward, fp32"))
MAX_LINES = 120  # per step: the tail of a longer log


def section_lines(out_dir: Path, seconds: float | None) -> tuple[str, list[str]]:
    """(device name, markdown lines) of the run whose logs are in `out_dir`."""
    gpu = (out_dir / "gpu.txt").read_text().strip().splitlines() if (out_dir / "gpu.txt").exists() else []
    device = gpu[0].split(",")[0].strip() if gpu else "unknown GPU"
    when = datetime.date.today().isoformat()
    took = f"; {seconds / 60:.1f} min in all" if seconds is not None else ""
    lines = [f"### GPU checks on {device}", "", f"`bash bench/gpu_checks.sh` on {when}{took}: "
             + "; ".join(line.strip() for line in gpu) + ".", ""]
    for stem, title in STEPS:
        log = out_dir / f"{stem}.log"
        if not log.exists():
            lines += [f"**{title}:** not run.", ""]
            continue
        text = log.read_text(errors="replace").splitlines()
        command = text[0].removeprefix("$ ") if text and text[0].startswith("$ ") else "?"
        body = [line for line in text[1:] if not line.startswith(("W1", "I1"))]  # drop torch's log-prefixed warnings
        if len(body) > MAX_LINES:
            body = [f"... ({len(body) - MAX_LINES} earlier lines in {log.name})"] + body[-MAX_LINES:]
        lines += [f"**{title}** (`{command}`):", "```", *body, "```", ""]
    return device, lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--results-md", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument("--seconds", type=float, default=None, help="the whole run's wall time")
    args = parser.parse_args(argv)
    device, lines = section_lines(args.out_dir, args.seconds)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    write_section(args.results_md, f"bench:gpu:{slug}", lines)
    print(f"wrote the {device} section of {args.results_md} ({len(lines)} lines)")


if __name__ == "__main__":
    main()
