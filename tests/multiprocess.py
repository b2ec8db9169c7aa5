"""Running a command as a torchrun job of a few CPU processes from a test: gloo, a free port (torchrun's
--standalone rendezvous binds port 0), one thread per process, the worktree first on every child's path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.update(extra)
    return env


def torchrun(nproc: int, args: list[str], *, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc -m <args...>`, output captured (not checked)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", "--monitor-interval=0.1", "-m", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=child_env(**env))
