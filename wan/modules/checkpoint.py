"""Reading and writing DiT experts in the official layout: `config.json` + sharded safetensors + index json.

Loading builds the model on the meta device and assigns each tensor as it is read (cast once to the requested
dtype), so an fp32 expert on disk never needs a second full copy in host memory. Shapes are checked from the
safetensors headers before any tensor is read, so a wrong checkpoint fails in seconds with a short message.
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
__all__ = ["CheckpointError", "load_wan_model", "save_wan_model", "shard_map"]


def shard_map(folder: Path) -> dict[str, list[str]]:
    """{shard file name: [tensor names]} from the index json, or the single-file checkpoint."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            shards.setdefault(fname, []).append(key)
    elif (folder / SINGLE_NAME).is_file():
        from safetensors import safe_open

        with safe_open(folder / SINGLE_NAME, framework="pt") as f:
            shards = {SINGLE_NAME: list(f.keys())}
    else:
        raise FileNotFoundError(f"missing {index} (and no single {SINGLE_NAME}); re-download this expert folder")
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FileNotFoundError(f"missing shard {folder / missing[0]}" + more
                                + "; the download is incomplete")
    return shards


def check_against_model(model: torch.nn.Module, folder: Path, shards: dict[str, list[str]]) -> None:
    """Key sets and shapes (from headers only) must match the model; report the first few problems."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found: dict[str, tuple] = {}
    for fname, keys in shards.items():
        with safe_open(folder / fname, framework="pt") as f:
            for k in keys:
                found[k] = tuple(f.get_slice(k).get_shape())
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [f"{k}: file {found[k]} vs model {expected[k]}" for k in expected
                 if k in found and found[k] != expected[k]]
    if problems:
        dim = found.get("patch_embedding.weight", (None,))[0]
        hint = f" (the file's dim is {dim}: a 1.3B or 5B checkpoint?)" if dim and dim != model.dim else ""
        raise CheckpointError(f"{folder} does not match its config.json: {'; '.join(problems[:4])}"
                              + (f" and {len(problems) - 4} more" if len(problems) > 4 else "") + hint)


def load_wan_model(cls, checkpoint_dir, subfolder=None, dtype: torch.dtype | None = None, device="cpu",
                   transform=None):
    """Build `cls` from config.json on meta, then assign the safetensors tensors shard by shard.

    `transform` (optional: `check(shapes)` and `apply(name, fp32 tensor) -> fp32 tensor`, e.g. a LoRA merge) runs on
    each tensor in fp32 on `device`, before the cast to `dtype`: one tensor at a time, never a second model copy."""
    from safetensors import safe_open

    folder = Path(checkpoint_dir) / subfolder if subfolder else Path(checkpoint_dir)
    config = WanConfig.from_json(folder / CONFIG_NAME)
    with torch.device("meta"):
        model = cls.from_config(config)
    shards = shard_map(folder)
    check_against_model(model, folder, shards)
    if transform is not None:
        transform.check({k: tuple(v.shape) for k, v in model.state_dict().items()})
    device = torch.device(device)
    for fname, keys in shards.items():
        with safe_open(folder / fname, framework="pt", device=str(device)) as f:
            part = {}
            for k in keys:  # one file tensor alive at a time: above the weights kept, at most one fp32 tensor
                t = f.get_tensor(k)
                if transform is not None and k in transform.targets:
                    t = transform.apply(k, t.float()).to(dtype or t.dtype)
                part[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
                del t
        model.load_state_dict(part, strict=False, assign=True)
        del part
    model.configure()  # re-bind the plain (non-module) attributes
    log.info("loaded %s from %s (%d shards, dtype %s)", cls.__name__, folder, len(shards),
             dtype or next(model.parameters()).dtype)
    return model.eval().requires_grad_(False)


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
