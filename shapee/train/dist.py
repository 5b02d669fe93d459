"""One way to run: a plain process (CPU or one GPU) or one process per GPU under torchrun (STYLE.md rule 7).

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; when they are present we
join the process group (NCCL on CUDA, gloo on CPU) with ``init_method="env://"``, as nanoGPT does. Without them we are
a single process of world size 1 and no collective is ever called.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its node, and its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # True when *we* created the process group (and so must destroy it); False if the caller had one already.
    owns_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Detect torchrun from the environment and join the process group if there is one.

    Args:
        device: force a device (``"cpu"``, ``"cuda"``); ``None`` picks ``cuda:<LOCAL_RANK>`` when CUDA is available
            and the CPU otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise RuntimeError(
            f"bad torchrun environment: RANK={rank} WORLD_SIZE={world_size} (need 0 ≤ RANK < WORLD_SIZE)"
        )

    if device is None:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
        owns_group = True
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, owns_group=owns_group)


def cleanup_distributed(info: DistInfo, synchronize: bool = False) -> None:
    """Leave the process group if :func:`init_distributed` created it.

    Args:
        synchronize: wait at a barrier first, so that no rank destroys the group while a peer is still inside a
            collective (give it only when every rank is known to get here: after a normal end, not after an error).
    """
    if info.owns_group and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_max(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise max of ``x`` over all ranks (identity in a single process); returns ``x`` reduced in place."""
    if info.is_distributed:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x
