"""Result files shared by the demo and the benchmarks: each writer owns one marked section."""
from __future__ import annotations

import csv
import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    """The machine figures were taken on: cores, CPU model, torch threads, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads, {gpu}"


def write_section(path: str | Path, marker: str, lines: list[str]) -> None:
    """Put `lines` between `<!-- marker -->` and `<!-- /kind -->` (kind = marker up to the first ':')
    in the markdown file `path`, replacing that section if present and keeping everything else."""
    path = Path(path)
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker.split(':')[0]} -->"
    section = "\n".join([begin, *lines, end])
    text = path.read_text() if path.exists() else "# Results\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def append_csv(path: str | Path, fields: list[str], rows: list[dict]) -> None:
    """Append `rows` to the CSV file at `path`, writing the header `fields` first when the file is new."""
    path = Path(path)
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
