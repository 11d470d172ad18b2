"""Loading DiT experts from any layout (wan/formats) and writing them in the official one (`config.json` + sharded
safetensors + index json).

Loading builds the model on the meta device and assigns each tensor as it is read (converted once to the requested
dtype), so an fp32 expert on disk never needs a second full copy in host memory. Keys and shapes are checked from the
headers before any tensor is read, so a wrong checkpoint fails in seconds with a short message.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..configs.model_config import WanConfig
from ..errors import CheckpointError

log = logging.getLogger("wan")

CONFIG_NAME = "config.json"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"
__all__ = ["CheckpointError", "load_dit", "load_wan_model", "save_wan_model"]


def load_wan_model(cls, checkpoint_dir, subfolder=None, dtype: torch.dtype | None = None, device="cpu",
                   transform=None):
    """Build `cls` from the folder's config.json on meta, then assign its tensors one at a time (`load_dit`).

    The folder is an official expert folder or a Diffusers transformer/ folder (detected from its headers).
    `transform` (optional: `check(shapes)` and `apply(name, fp32 tensor) -> fp32 tensor`, e.g. a LoRA merge) runs on
    each tensor in fp32 on `device`, before the cast to `dtype`: one tensor at a time, never a second model copy."""
    from ..formats.resolve import dit_source

    folder = Path(checkpoint_dir) / subfolder if subfolder else Path(checkpoint_dir)
    if not (folder / CONFIG_NAME).is_file():
        WanConfig.from_json(folder / CONFIG_NAME)  # its FileNotFoundError names the file
    return load_dit(cls, dit_source(folder, f"the DiT in {folder}", target="its config.json"), dtype, device, transform)


def load_dit(cls, source, dtype: torch.dtype | None = None, device="cpu", transform=None, fp8=None):
    """`cls` from a planned `wan.formats.WeightSource` (any layout; its shapes were checked against
    `source.config` from the headers), built on meta, each tensor converted and assigned one at a time.

    Per tensor, in file order: read (dequantized if the file is fp8 or GGUF, as its tool computes it, in `dtype`),
    `transform.apply` in fp32 where it targets the tensor, cast to `dtype` (None: float32, the reference's dtype).
    Above the weights kept, at most one file tensor is alive (plus a LoRA merge's fp32 temporaries).
    `fp8` = (which, kernel) (the --fp8_linear choice): e4m3fn fp8_scaled weights of those linears that no transform
    changes stay fp8, their per-tensor scale as the GEMM's weight scale (wan.modules.fp8.Fp8Linear); every other
    weight is dequantized."""
    target = dtype or torch.float32
    with torch.device("meta"):
        model = cls.from_config(source.config)
    if transform is not None:
        transform.check({k: tuple(v.shape) for k, v in model.state_dict().items()})
    keep = _fp8_kept(model, source, transform, fp8) if fp8 else frozenset()
    modules = {name.removesuffix(".weight") for name in keep}
    device = torch.device(device)
    part = {}
    for name, t in source.read(dequant_dtype=target, device=device, keep_fp8=keep):
        if name in keep:  # (e4m3fn values, fp32 scale): the scale repeated per output row, as Fp8Linear takes it
            values, scale = t
            part[name] = values
            part[name.removesuffix("weight") + "weight_scale"] = scale.reshape(1).expand(values.shape[0]).contiguous()
            continue
        if transform is not None and name in transform.targets:
            t = transform.apply(name, t.float())
        module, _, leaf = name.rpartition(".")
        part[name] = t.to(torch.bfloat16 if leaf == "bias" and module in modules else target)
        del t
    model.load_state_dict(part, strict=False, assign=True)
    del part
    model.configure()  # re-bind the plain (non-module) attributes
    log.info("loaded %s: %s%s", cls.__name__, source.describe(target),
             f"; {len(keep)} fp8 weights kept as stored (per-tensor scale)" if keep else "")
    return model.eval().requires_grad_(False)


def _fp8_kept(model, source, transform, fp8) -> frozenset[str]:
    """The weights that stay fp8 for `fp8` = (which, kernel): e4m3fn in the file, an --fp8_linear target, untouched
    by `transform`; their modules become Fp8Linear (on meta) before any tensor is read."""
    from .fp8 import TARGETS, Fp8Linear

    which, kernel = fp8
    keep = set()
    for n, block in enumerate(model.blocks):
        for path in TARGETS[which]:
            name = f"blocks.{n}.{path}.weight"
            plan = source.plans.get(name)
            if plan is None or plan.dtype != "F8_E4M3" or (transform is not None and name in transform.targets):
                continue
            parent_name, _, leaf = path.rpartition(".")
            parent, old = block.get_submodule(parent_name), block.get_submodule(path)
            new = Fp8Linear(old.in_features, old.out_features, old.bias is not None, kernel, device="meta")
            new.from_file = True  # convert_linears_to_fp8_ counts it instead of converting it
            setattr(parent, leaf, new)
            keep.add(name)
    return frozenset(keep)


def save_wan_model(model: torch.nn.Module, folder, max_shard_bytes: int = 10 * 2**30) -> None:
    """Write config.json, shards `diffusion_pytorch_model-0000i-of-0000n.safetensors` and the index json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", **model.config.json_dict()}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    groups, size = [[]], 0
    for k, v in model.state_dict().items():
        nbytes = v.numel() * v.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    state = model.state_dict()
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k].detach().contiguous().cpu() for k in keys}, folder / fname)
        weight_map.update({k: fname for k in keys})
        total += sum(state[k].numel() * state[k].element_size() for k in keys)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
