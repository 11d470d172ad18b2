"""What a task needs besides the DiT architecture (which each expert's config.json holds)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model_config import A14B, WanConfig

# The reference's default negative prompt (used when n_prompt is empty; the CLI has no flag for it).
DEFAULT_NEG_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


@dataclass(frozen=True)
class TaskConfig:
    name: str
    # files inside --ckpt_dir (the official layout)
    t5_checkpoint: str = "models_t5_umt5-xxl-enc-bf16.pth"
    t5_tokenizer: str = "google/umt5-xxl"
    vae_checkpoint: str = "Wan2.1_VAE.pth"
    low_noise_checkpoint: str = "low_noise_model"
    high_noise_checkpoint: str = "high_noise_model"
    model_checkpoint: str = ""  # one-model tasks (boundary None): the DiT's folder, "" = the folder root
    vae_version: str = "2.1"  # "2.1": Wan2_1_VAE (z 16, 4x8x8); "2.2": Wan2_2_VAE (z 48, 4x16x16)
    # numerics and geometry
    text_len: int = 512
    t5_dtype: torch.dtype = torch.bfloat16
    param_dtype: torch.dtype = torch.bfloat16
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_train_timesteps: int = 1000
    boundary: float | None = 0.875  # t >= boundary * 1000 -> high-noise expert; None: one model, no switch
    # sampling defaults (generate.py fills unset flags from these)
    sample_fps: int = 16
    sample_shift: float = 12.0
    sample_steps: int = 40
    sample_guide_scale: tuple[float, float] = (3.0, 4.0)  # (low-noise expert, high-noise expert)
    frame_num: int = 81
    default_size: str = "1280*720"
    supported_sizes: tuple[str, ...] = ("720*1280", "1280*720", "480*832", "832*480")
    sample_neg_prompt: str = DEFAULT_NEG_PROMPT
    needs_ckpt_dir: bool = True
    checkpoint_name: str = "Wan2.2-T2V-A14B"  # the official download --ckpt_dir should point at
    # the architecture both experts' config.json must describe (checked before loading)
    arch: WanConfig = A14B

    @property
    def experts(self) -> dict[str, str]:
        """The DiTs by the name the sample loop uses -> their folder in --ckpt_dir: the high- and low-noise experts
        of the A14B tasks, or one "model" (TI2V-5B: the DiT at the folder root)."""
        if self.boundary is None:
            return {"model": self.model_checkpoint}
        return {"high": self.high_noise_checkpoint, "low": self.low_noise_checkpoint}

    @property
    def takes_image(self) -> bool:
        """generate() takes a first frame: required for i2v, optional for ti2v (text-to-video without one)."""
        return self.arch.model_type in ("i2v", "ti2v")

    @property
    def needs_image(self) -> bool:
        """An image-to-video task that cannot run without its first frame (i2v)."""
        return self.arch.model_type == "i2v"
