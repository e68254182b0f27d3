"""World info and collectives; every function is a no-op in a single process.

Detects ``torchrun`` from the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` environment (as nanoGPT).
Collectives carry only small tensors (per-example features, per-domain statistics); ranks may hold
different numbers of rows (:func:`all_gather_cat` pads to the largest share and trims). Under NCCL,
CPU tensors are staged through this rank's GPU and the results come back on the caller's device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["World", "all_gather_cat", "all_gather_object", "all_reduce_sum", "barrier", "init_world"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device: str = "cpu") -> World:
    """Initialise the process group when launched by torchrun; else a 1-process world.

    ``device`` is ``train.device``: ``"auto"`` or ``"cuda..."`` with CUDA available gives NCCL (and
    binds this process to GPU ``LOCAL_RANK``), anything else gloo.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = (device == "auto" or device.startswith("cuda")) and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where the backend can reduce ``tensor``: this rank's GPU for NCCL, else where it is."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks (in place and returned); identity on one process."""
    if _active():
        staged = tensor.to(_comm_device(tensor))
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        if staged is not tensor:
            tensor.copy_(staged)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order.

    Ranks may contribute different numbers of rows (dim 0); the trailing shape and dtype must agree.
    Sizes are exchanged first, every share is padded to the largest one for ``all_gather`` and the
    padding is dropped again, so the result is bit-identical on every rank.
    """
    if not _active():
        return tensor
    world = dist.get_world_size()
    home = tensor.device
    tensor = tensor.to(_comm_device(tensor)).contiguous()
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, pad], dim=0)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.cat([part[:count] for part, count in zip(parts, counts)], dim=0).to(home)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` on one process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _active():
        dist.barrier()
