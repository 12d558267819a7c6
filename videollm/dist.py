"""Distributed set-up and the few collective helpers the runner needs.

Launch with ``torchrun --nproc_per_node=N train.py ...``: torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``); SLURM's ``SLURM_PROCID`` is read as well,
as the original Video-LLaMA did. The backend is NCCL on CUDA and gloo on CPU. Without those
variables the run is a single process and every helper here is a no-op.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

from videollm.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "cpu", dist_url: str = "env://", timeout_minutes: int = 60) -> DistInfo:
    """Read the launcher's environment, pick the device and join the process group.

    Args:
        device: ``run.device`` ("cpu", "cuda"); with CUDA each process takes ``cuda:LOCAL_RANK``.
        dist_url: ``run.dist_url`` (``env://`` uses ``MASTER_ADDR``/``MASTER_PORT``).
    """
    rank = _env_int("RANK")
    world = _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK")
    if rank is None and _env_int("SLURM_PROCID") is not None:
        rank = _env_int("SLURM_PROCID")
        world = _env_int("SLURM_NTASKS") or 1
        local = rank % max(torch.cuda.device_count(), 1)
    rank, world, local = rank or 0, world or 1, local or 0

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("run.device: 'cuda' asked for, but no CUDA device is visible; set run.device=cpu")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ConfigError(f"run.device: unknown device {device!r}; use cpu or cuda")

    info = DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method=dist_url,
            world_size=world,
            rank=rank,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        info.backend = backend
        logger.info("joined process group: rank %d of %d (%s, %s)", rank, world, backend, dev)
    elif dist.is_initialized():
        info.backend = dist.get_backend()
    return info


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(value: float | int, device: torch.device | str = "cpu") -> float:
    """Sum a Python number over all ranks (float64 on the wire, so token counts stay exact)."""
    if not is_dist():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
