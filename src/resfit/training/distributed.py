"""torchrun support: who this process is, and decisions that rank 0 makes for every rank.

Under ``torchrun`` (WORLD_SIZE > 1) the loop runs as DistributedDataParallel: gloo on CPU,
NCCL on GPU, each rank taking its share of every global batch; rank 0 logs and writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def from_rank0(values: list[float], dist_info: Dist, device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every rank. A decision such as "stop now" or "this epoch is the
    best" must be the same everywhere: ranks that disagree wait for each other forever at the
    next collective."""
    if dist_info.world <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def barrier(dist_info: Dist) -> None:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def min_across_ranks(value: int, dist_info: Dist, device: torch.device) -> int:
    """The smallest ``value`` of all ranks (how many batches every rank can fill)."""
    if dist_info.world <= 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def local_world() -> int:
    """How many ranks share this machine (and its memory)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def gathered(items: list, dist_info: Dist) -> list:
    """The concatenation of every rank's ``items`` (picklable), in rank order."""
    if dist_info.world <= 1:
        return items
    import torch.distributed as dist

    parts: list = [None] * dist_info.world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]
