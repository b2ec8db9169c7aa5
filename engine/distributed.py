"""Multi-process runs under `torchrun`: read the launcher's environment, start the process group, and the
few collectives the engine uses (`bahe encode --distributed`, `bahe train --distributed`).

Each process (rank) owns one device: `cuda:LOCAL_RANK` where CUDA is available, else the CPU. Tensors that
cross ranks go through gloo (CPU) for ABE, whose rows are CPU tensors anyway, and through the training group's
backend (NCCL on CUDA, gloo on the CPU) for gradients."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """The process was not started the way a distributed run needs (torchrun's environment)."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun job."""
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes every file a distributed run produces; the others only compute."""
        return self.rank == 0

    def device(self, requested: str = "auto") -> torch.device:
        """'auto': cuda:LOCAL_RANK when CUDA is there, else the CPU; 'cpu' forces the CPU; 'cuda' means this
        rank's GPU (LaunchError when CUDA is missing or has fewer GPUs than local ranks)."""
        if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if requested not in ("auto", "cuda"):
            raise LaunchError(f"--device {requested!r} under torchrun: expected 'auto', 'cpu' or 'cuda' (each rank "
                              "takes cuda:LOCAL_RANK)")
        if not torch.cuda.is_available():
            raise LaunchError("--device cuda under torchrun, but CUDA is not available")
        if self.local_rank >= torch.cuda.device_count():
            raise LaunchError(f"local rank {self.local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                              "start at most that many processes per node")
        return torch.device("cuda", self.local_rank)


def _int_variable(env: dict[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from None


def launch_from_env(env: dict[str, str] | None = None, *, command: str = "bahe") -> Launch:
    """The torchrun environment of this process; LaunchError saying what is missing or inconsistent."""
    env = dict(os.environ if env is None else env)
    missing = [name for name in LAUNCH_VARIABLES if name not in env]
    if missing:
        raise LaunchError(f"{command} --distributed must be started by torchrun (e.g. `torchrun --nproc-per-node 2 "
                          f"-m engine.cli ...`): environment variables {', '.join(missing)} are not set")
    rank, world, local = (_int_variable(env, n) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world < 1:
        raise LaunchError(f"WORLD_SIZE must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise LaunchError(f"RANK must be in [0, WORLD_SIZE={world}), got {rank}")
    if not 0 <= local <= rank:
        raise LaunchError(f"LOCAL_RANK must be in [0, RANK={rank}], got {local}")
    return Launch(rank, world, local)


def check_not_launched(command: str, env: dict[str, str] | None = None) -> None:
    """LaunchError when a command without --distributed runs as one of several torchrun processes: each would
    write the same files."""
    env = os.environ if env is None else env
    world = env.get("WORLD_SIZE")
    if world is not None and world.strip() not in ("", "1"):
        raise LaunchError(f"{command} runs under torchrun with WORLD_SIZE={world}: pass --distributed (without it "
                          "every process would write the same output)")


def start(launch: Launch, device: torch.device) -> None:
    """Join the job's process group: NCCL for CUDA devices (with a gloo side for CPU objects), gloo otherwise."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_outcome(error: BaseException | None, writer: int = 0) -> None:
    """After the writer's step, every rank learns whether it failed: the others raise a LaunchError naming the
    writer's error, so the whole job exits non-zero, not just rank 0 (call on every rank)."""
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(message, src=writer)
    if message[0] is not None and dist.get_rank() != writer:
        raise LaunchError(f"rank {writer} failed: {message[0]}")
