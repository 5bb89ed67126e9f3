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

from .errors import CheckpointError, InputError

__all__ = ["Dist", "init", "close", "active", "all_sum", "all_max", "gather", "broadcast", "on_rank0", "wrap", "per_rank",
           "agreed_stop"]


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


def wrap(model: torch.nn.Module, device: torch.device, d: Dist) -> torch.nn.Module:
    """DistributedDataParallel under torchrun (every trainable parameter synchronised, the student's alignment
    projections included), the model itself in one process."""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def per_rank(value, what: str, d: Dist):
    """This rank's entry of a checkpoint value saved per rank (a list under torchrun)."""
    if not isinstance(value, list):
        if d.active and value is not None:
            raise CheckpointError(f"--resume: the checkpoint was written by 1 process; resume with 1 (this is {d.world_size})")
        return value
    if len(value) != d.world_size:
        raise CheckpointError(f"--resume: the checkpoint's {what} is of {len(value)} processes; resume with "
                              f"--nproc_per_node {len(value)} (this is {d.world_size})")
    return value[d.rank]


def agreed_stop(signum: int | None, step: int, device: torch.device, d: Dist) -> int:
    """The stop request all ranks act on: this process's own in one process; under torchrun the largest
    request of any rank, read every 10 steps (so all ranks stop at the same step)."""
    if not d.active:
        return signum or 0
    if step % 10:
        return 0
    return int(all_max(torch.tensor([signum or 0], device=device)).item())
