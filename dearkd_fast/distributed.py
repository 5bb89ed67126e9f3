"""torchrun support: the process group from torchrun's environment, and what ranks share.

`torchrun --nproc_per_node=N -m dearkd_fast.train ...` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK set; `init()` joins them (NCCL on CUDA, Gloo on the CPU). Without torchrun there is one
process and every helper here is the identity. Multi-node runs use torchrun's own rendezvous flags
(`--nnodes`, `--node-rank`, `--rdzv-endpoint`, ...); nothing here is home-made.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import InputError

__all__ = ["Dist", "init", "close", "active", "all_sum", "all_max", "gather", "broadcast", "on_rank0"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes files and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1; the device of this rank (cuda:LOCAL_RANK on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is one of several (a process group of more than one rank is up)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """`op` of `t` over ranks (a new tensor; `t` itself when there is one process)."""
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t, op=op)
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def gather(obj: Any) -> list:
    """Every rank's `obj`, in rank order (pickled through the process group)."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn):
    """fn() on rank 0 alone (claiming the output folder, say); its refusal (InputError) is raised on every
    rank alike, so all stop together. Rank 0 gets fn's result, the others None."""
    err, res = None, None
    if not active() or dist.get_rank() == 0:
        try:
            res = fn()
        except InputError as e:
            err = e
    msg = broadcast(str(err) if err is not None else None)
    if err is not None:
        raise err
    if msg is not None:
        raise InputError(msg)
    return res
