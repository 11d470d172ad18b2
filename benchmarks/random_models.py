"""Full-size models with seeded random weights, built on the GPU from the meta device (no checkpoint needed).

Timing does not depend on weight values, but numerics do: every weight is drawn (never zeros; the reference zero-
initialises the head), from one seed, in fp32 and then cast, so bf16 and fp32 rows hold the same values.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from wan.configs.model_config import A14B, A14B_I2V, TI2V_5B, TINY, TINY_I2V, TINY_TI2V
from wan.modules.model import WanModel
from wan.testing.random_init import materialize_random_

# "256": full-size models at 256x256 (CPU-sized checks of the full-size VAEs, e.g. the bf16 decode's error)
RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720), "tiny": (64, 64), "256": (256, 256)}
# --task of the benchmarks: text-to-video, image-to-video (36-channel experts, condition y), or TI2V-5B (one 48-channel
# model on the Wan 2.2 VAE; its 720p is 1280x704, its frames 121)
TASKS = ("t2v", "i2v", "ti2v")
TI2V_RESOLUTIONS = {**RESOLUTIONS, "720p": (1280, 704)}


def arch_for(task: str = "t2v", tiny: bool = False):
    return {("t2v", False): A14B, ("t2v", True): TINY, ("i2v", False): A14B_I2V, ("i2v", True): TINY_I2V,
            ("ti2v", False): TI2V_5B, ("ti2v", True): TINY_TI2V}[task, tiny]


def size_for(res: str, task: str = "t2v") -> tuple[int, int]:
    """(width, height) of a --res for a task: TI2V-5B's 720p is 1280x704 (its sizes are multiples of 32)."""
    return (TI2V_RESOLUTIONS if task == "ti2v" else RESOLUTIONS)[res]


def task_config(task: str, tiny: bool = False):
    """The TaskConfig of a benchmark --task: t2v-A14B, i2v-A14B, ti2v-5B, or their tiny siblings."""
    from wan.configs import WAN_CONFIGS

    return WAN_CONFIGS[f"{task}-tiny" if tiny else {"ti2v": "ti2v-5B"}.get(task, f"{task}-A14B")]


@torch.no_grad()
def random_expert(device, dtype: torch.dtype, seed: int = 0, tiny: bool = False, task: str = "t2v") -> WanModel:
    """One expert on `device` with seeded N(0, 1/fan_in) matrices, drawn in fp32 per tensor, stored in `dtype`
    (built in `dtype`: never a whole fp32 copy on the device); `task` i2v: the 36-input-channel expert."""
    with torch.device("meta"):
        model = WanModel.from_config(arch_for(task, tiny))
    model = materialize_random_(model, device, dtype, seed)
    return model.configure().eval().requires_grad_(False)


@torch.no_grad()
def random_t5(device, tiny: bool = False):
    """umt5-xxl encoder (bf16) with random weights and the offline tiny tokenizer (token ids < its vocab)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from wan.modules.t5 import T5EncoderModel
    from wan.modules.tokenizers import HuggingfaceTokenizer
    from wan.testing.tiny_t5 import write_tiny_tokenizer

    cfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)
    if tiny:
        cfg = UMT5Config(vocab_size=128, d_model=4096, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
                         feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    model = materialize_random_(model, device, torch.bfloat16, seed=7)
    model.tie_weights()  # encoder.embed_tokens shares shared.weight
    enc = object.__new__(T5EncoderModel)  # bypass file loading; same __call__
    tok_dir = write_tiny_tokenizer(str(Path(tempfile.mkdtemp()) / "tok"))
    enc.text_len, enc.dtype, enc.device = 512, torch.bfloat16, torch.device(device)
    # The pipeline keeps T5 in host memory between prompts (as after loading the official .pth): mirror that.
    enc.model = model.eval().requires_grad_(False).cpu()
    enc.tokenizer = HuggingfaceTokenizer(name=tok_dir, seq_len=512, clean="whitespace")
    return enc


def random_vae(device, tiny: bool = False, dtype: torch.dtype = torch.float32, version: str = "2.1"):
    """The Wan 2.1 VAE (base_dim 96; 8 when tiny), or with version "2.2" the Wan 2.2 VAE (dims 160 / 256; 8 / 16 when
    tiny), with seeded random weights written in the original layout and read through the real loader."""
    from wan.modules.vae2_2 import VAE_CLASSES

    path = Path(tempfile.mkdtemp()) / f"Wan{version}_VAE.pth"
    if version == "2.2":
        from wan.testing.tiny_vae22 import write_tiny_vae22_checkpoint

        write_tiny_vae22_checkpoint(str(path), seed=5, base_dim=8 if tiny else 160,
                                    decoder_base_dim=16 if tiny else 256)
    else:
        from wan.testing.tiny_vae import write_tiny_vae_checkpoint

        write_tiny_vae_checkpoint(str(path), seed=5, base_dim=8 if tiny else 96)
    try:
        return VAE_CLASSES[version](vae_pth=str(path), dtype=dtype, device=device)
    finally:
        path.unlink()  # loaded (the full-size 2.2 file is 2.8 GB)


def random_pipeline(options, device, tiny: bool = False, n_experts: int = 2, with_text: bool = True,
                    task: str = "t2v", **kw):
    """WanT2V (task t2v), WanI2V (i2v) or WanTI2V (ti2v: one model) over random models. n_experts=1 shares one
    expert for both noise levels (for per-forward timing). `kw`: the pipeline's lora_high=, lora_low=, lora_dir=,
    lora_strength= (merged into the experts as the real loader would) and plan_for=(width, height, frames) for
    options.max_gpu_memory."""
    from wan.image2video import WanI2V
    from wan.modules.vae import VAE_DTYPES
    from wan.text2video import WanT2V
    from wan.textimage2video import WanTI2V

    cfg = task_config(task, tiny)
    dtype = torch.bfloat16 if options.convert_model_dtype and torch.device(device).type == "cuda" else torch.float32
    high = random_expert(device, dtype, seed=0, tiny=tiny, task=task)
    low = high if n_experts == 1 or cfg.boundary is None else random_expert(device, dtype, seed=1, tiny=tiny, task=task)
    comps = dict(text_encoder=random_t5(device, tiny) if with_text else None,
                 vae=random_vae(device, tiny, VAE_DTYPES[options.vae_dtype], cfg.vae_version) if with_text else None,
                 low_noise_model=low, high_noise_model=high, model=high)
    pipeline = {"t2v": WanT2V, "i2v": WanI2V, "ti2v": WanTI2V}[task]
    return pipeline(cfg, None, device=device, options=options, components=comps, **kw)


def random_image(width: int, height: int, seed: int = 0):
    """A smooth random RGB picture (PIL) of this size: the first frame of the I2V benchmarks."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(xx / (40 + 9 * c) + c) * np.cos(yy / (30 + 7 * c)) for c in range(3)], -1) * 90 + 128
    return Image.fromarray(np.clip(base + g.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
