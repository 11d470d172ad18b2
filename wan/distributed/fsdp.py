"""FSDP sharding of the DiT experts and the T5 encoder with FSDP2 (`torch.distributed.fsdp.fully_shard`).

As the reference's `shard_model`: every DiT block (every T5 block) is its own unit, then the root takes what is left
(embeddings, head). Full sharding over the given mesh (by default the whole world, as the reference), parameters
gathered in `param_dtype` (bf16 on GPUs), reductions in fp32. Forward inputs are NOT cast (cast_forward_inputs=False,
like FSDP1's default for non-root units): the fp32 time modulation e0 must reach the blocks in fp32, and the
residual stream keeps the dtype autocast gives it, exactly as without FSDP.

FSDP2 runs on CPU with gloo too (tests use param_dtype=float32 there). It moves each unit's parameters to the mesh's
device while sharding, so a model loaded on the CPU never needs a full copy on the GPU.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["as_mesh", "shard_model", "shard_t5"]


def as_mesh(mesh_or_group=None):
    """A 1-D DeviceMesh from a DeviceMesh, a ProcessGroup, or None (the whole world)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if isinstance(mesh_or_group, DeviceMesh):
        return mesh_or_group
    group = mesh_or_group if mesh_or_group is not None else dist.distributed_c10d._get_default_group()
    device_type = "cuda" if "nccl" in str(dist.get_backend(group)) else "cpu"
    if mesh_or_group is None:
        return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    return DeviceMesh.from_group(group, device_type)


def _shard_units(root: nn.Module, units, mesh, param_dtype, reduce_dtype, prefetch: bool) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = as_mesh(mesh)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    units = list(units)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    if prefetch:
        # all-gather block i+1 while block i computes (the CPU issues it at block i's start)
        for unit, nxt in zip(units, units[1:]):
            unit.set_modules_to_forward_prefetch([nxt])
    return root


def shard_model(model: nn.Module, mesh_or_group=None, param_dtype: torch.dtype | None = torch.bfloat16,
                reduce_dtype: torch.dtype | None = torch.float32, prefetch: bool = True) -> nn.Module:
    """Shard a WanModel in place: each of `model.blocks` one FSDP unit, then the root. Returns the model.

    `model(...)` keeps its call style; parameters become DTensor shards (use `model.parameters()` only through
    FSDP's APIs afterwards). param_dtype=None keeps the stored dtype (use float32 on CPU to compare with fp32 runs).
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    _shard_units(model, model.blocks, mesh_or_group, param_dtype, reduce_dtype, prefetch)
    if hasattr(model, "forward_residual"):  # step caching's forward (wan/step_cache.py) gathers the root too
        register_fsdp_forward_method(model, "forward_residual")
    return model


def shard_t5(umt5_model: nn.Module, mesh_or_group=None, param_dtype: torch.dtype | None = None,
             reduce_dtype: torch.dtype | None = torch.float32, prefetch: bool = True) -> nn.Module:
    """Shard the umt5 encoder (transformers UMT5EncoderModel) per T5 block, then the root (embeddings, tied).

    Usable as `T5EncoderModel(..., shard_fn=lambda m: shard_t5(m, group))` or on `text_encoder.model` afterwards.
    param_dtype=None keeps the checkpoint's dtype (bf16).
    """
    encoder = getattr(umt5_model, "encoder", umt5_model)
    return _shard_units(umt5_model, encoder.block, mesh_or_group, param_dtype, reduce_dtype, prefetch)
