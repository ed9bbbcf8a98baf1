"""torch.distributed for a run started by torchrun (NCCL on GPU, gloo on CPU); a no-op for one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from resfast.train.errors import SettingError

__all__ = ["Dist", "setup"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (returned for chaining). On the GPU it queues without a host sync."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1:
            dist.destroy_process_group()


def setup(requested: str) -> tuple[Dist, torch.device]:
    """(this process's place, its device) for ``--device`` ``requested`` (auto, cpu or cuda).

    torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is one process.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SettingError("--device cuda: torch sees no CUDA device here (use --device cpu or auto)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    info = Dist(rank=int(os.environ.get("RANK", "0")), world_size=world_size)
    device = torch.device(requested, local_rank) if requested == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device
