"""torch.distributed setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs, gloo on CPU.

Collectives time out after WAN_DIST_TIMEOUT_MINUTES (default 15) instead of blocking forever when a rank dies; the
failing rank exits non-zero, which makes torchrun end the others at once (the timeout is the backstop without it).
`parallel_groups` builds the (cfg, sp) DeviceMesh the pipeline uses.
"""
from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("wan")
TIMEOUT_ENV = "WAN_DIST_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 15.0


def dist_timeout() -> timedelta:
    """Collective / store timeout: $WAN_DIST_TIMEOUT_MINUTES (float, > 0) or 15 minutes."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        minutes = float(raw) if raw else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of minutes, got {raw!r}") from None
    if minutes <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0, got {raw!r}")
    return timedelta(minutes=minutes)


def abort_process_group() -> None:
    """Tear the default group down without waiting for peers (abort where this torch has it, else destroy)."""
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if abort is not None and "nccl" in str(dist.get_backend()):  # torch's abort is NCCL-only
            abort()
        else:  # gloo: destroying closes the connections, so peers fail at once ("Connection closed by peer")
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - already failing; never mask the original error
        log.debug("process group abort failed: %s", exc)


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

    def shutdown(self, error: bool | None = None) -> None:
        """Destroy the process group; abort it instead when `error` (default: an exception is propagating)."""
        if not (self.world_size > 1 and dist.is_initialized()):
            return
        if error is None:
            error = sys.exc_info()[0] is not None
        if error:
            abort_process_group()
        else:
            dist.destroy_process_group()

    def abort(self) -> None:
        """Abort the process group (peers blocked in a collective with this rank fail or time out, never hang)."""
        if self.world_size > 1:
            abort_process_group()


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
                                    timeout=dist_timeout(), **({"device_id": device} if use_cuda else {}))
    else:
        device = torch.device(device_arg) if device_arg else (
            torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    return DistContext(rank, world, local_rank, device)


@dataclass
class ParallelGroups:
    """Process groups of one multi-rank run: mesh (cfg, sp); cfg group (2 ranks with CFG parallel, else 1);
    sp group (ulysses_size ranks); fsdp_mesh over the whole world (the reference shards over every rank)."""
    mesh: object
    cfg_group: object
    cfg_rank: int
    sp_group: object
    fsdp_mesh: object


def parallel_groups(options, device: torch.device, num_heads: int = 40) -> ParallelGroups:
    """Build the groups from `options` (ulysses_size, cfg_parallel) over the initialised default group.

    Raises a one-line ValueError when world size != ulysses_size x (2 if cfg_parallel else 1).
    """
    from torch.distributed.device_mesh import init_device_mesh

    from ..options import check_parallel_layout

    world = dist.get_world_size()
    check_parallel_layout(options, world, num_heads)
    cfg_ways = 2 if options.cfg_parallel else 1
    device_type = torch.device(device).type
    mesh = init_device_mesh(device_type, (cfg_ways, options.ulysses_size), mesh_dim_names=("cfg", "sp"))
    fsdp_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("fsdp",))
    return ParallelGroups(mesh, mesh["cfg"].get_group(), mesh.get_local_rank("cfg"), mesh["sp"].get_group(),
                          fsdp_mesh)
