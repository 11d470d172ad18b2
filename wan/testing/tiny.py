"""The built-in tiny models (tasks t2v-tiny, i2v-tiny and ti2v-tiny): random weights from fixed seeds, written as a real
checkpoint folder in the official Wan2.2-T2V-A14B / -I2V-A14B / -TI2V-5B layout and then loaded through the real
loaders. Their videos are noise.

Layout written: models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (a sentencepiece tokenizer trained offline), and
- t2v / i2v: Wan2.1_VAE.pth (base_dim 8), high_noise_model/ and low_noise_model/ (config.json + sharded safetensors +
  index); the experts differ (i2v: model_type i2v, in_dim 36);
- ti2v: Wan2.2_VAE.pth (dims 8 / 16, z 48) and one DiT (model_type ti2v, 48 channels in and out) at the folder root.
Every task has its own cache folder.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("wan")

FORMAT_VERSION = "2"  # bump when the tiny architecture, seeds or init rule change (the cache folder name follows it)
MARKER = ".wan_tiny_complete"
TINY_SEEDS = {"high_noise_model": 1, "low_noise_model": 2, "t5": 3, "vae": 4, "model": 5, "vae22": 6}


def default_tiny_dir(task: str = "t2v-tiny") -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wan22" / f"{task}-v{FORMAT_VERSION}"


def tiny_arch(task: str = "t2v-tiny"):
    """The DiT architecture of a tiny task (configs.model_config.TINY, TINY_I2V or TINY_TI2V)."""
    from ..configs import WAN_CONFIGS

    cfg = WAN_CONFIGS.get(task)
    if cfg is None or cfg.needs_ckpt_dir:
        raise ValueError(f"{task!r} is not a tiny task; choose one of "
                         f"{', '.join(n for n, c in WAN_CONFIGS.items() if not c.needs_ckpt_dir)}")
    return cfg.arch


def build_tiny_dit(seed: int, arch=None):
    """A tiny DiT (default configs.model_config.TINY; text_dim stays 4096, config.json cannot change it)."""
    from ..configs.model_config import TINY
    from ..modules.model import WanModel
    from .random_init import randomize_weights_

    return randomize_weights_(WanModel.from_config(arch or TINY), seed=seed).eval()


def write_tiny_checkpoint(folder, task: str = "t2v-tiny") -> Path:
    """Write every file of a tiny task's checkpoint into `folder` (deterministic: same bytes of weights every
    time)."""
    from ..configs import WAN_CONFIGS
    from ..modules.checkpoint import save_wan_model
    from .tiny_t5 import write_tiny_t5
    from .tiny_vae import write_tiny_vae_checkpoint
    from .tiny_vae22 import write_tiny_vae22_checkpoint

    arch, cfg = tiny_arch(task), WAN_CONFIGS[task]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_t5(str(folder), seed=TINY_SEEDS["t5"], d_model=4096)
    if cfg.vae_version == "2.2":
        write_tiny_vae22_checkpoint(str(folder / cfg.vae_checkpoint), seed=TINY_SEEDS["vae22"])
    else:
        write_tiny_vae_checkpoint(str(folder / cfg.vae_checkpoint), seed=TINY_SEEDS["vae"])
    for name, sub in cfg.experts.items():
        # small shards so the sharded-index path is exercised like the real 6-shard experts (3 for TI2V-5B)
        seed = TINY_SEEDS["model" if name == "model" else sub]
        save_wan_model(build_tiny_dit(seed, arch), folder / sub, max_shard_bytes=2 * 2**20)
    (folder / MARKER).write_text(FORMAT_VERSION)
    return folder


def ensure_tiny_checkpoint(ckpt_dir=None, task: str = "t2v-tiny") -> Path:
    """The tiny task's checkpoint folder, written once (atomically: a temp folder renamed into place)."""
    tiny_arch(task)  # a tiny task, before anything is written
    folder = Path(ckpt_dir) if ckpt_dir else default_tiny_dir(task)
    if (folder / MARKER).is_file():
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists but is not a complete tiny checkpoint; remove it or pick another "
                              f"--ckpt_dir for --task {task}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        log.info("writing the tiny random checkpoint to %s", folder)
        with torch.random.fork_rng():
            write_tiny_checkpoint(tmp, task)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
