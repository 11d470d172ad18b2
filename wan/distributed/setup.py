"""torch.distributed setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs, gloo on CPU."""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0 draws the seed when it is -1; every rank gets the same one, so every rank draws the same noise."""
        if seed < 0 and self.rank == 0:
            seed = random.randint(0, sys.maxsize)
        if self.world_size > 1:
            box = [seed]
            dist.broadcast_object_list(box, src=0)
            seed = box[0]
        return seed

    def shutdown(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(options, device_arg: str | None = None) -> DistContext:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if world > 1:
        device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://", rank=rank, world_size=world,
                                    **({"device_id": device} if use_cuda else {}))
    else:
        device = torch.device(device_arg) if device_arg else (
            torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    return DistContext(rank, world, local_rank, device)
