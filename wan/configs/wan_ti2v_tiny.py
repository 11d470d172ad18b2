"""The tiny built-in text-image-to-video model: ti2v-5B's sampling defaults (shift 5, guide 5.0, 24 fps) with t2v-tiny's
frames and steps, a tiny random 48-channel DiT and a tiny Wan 2.2 VAE, written in the official Wan2.2-TI2V-5B layout
(the DiT at the folder root). Sizes are multiples of 32 (the VAE's 16 times the patch's 2). Its video is noise: it
proves the install and the pipeline, not quality."""
from dataclasses import replace

from .model_config import TINY_TI2V
from .wan_t2v_tiny import t2v_tiny
from .wan_ti2v_5B import ti2v_5B

ti2v_tiny = replace(ti2v_5B, name="ti2v-tiny", sample_steps=t2v_tiny.sample_steps, frame_num=t2v_tiny.frame_num,
                    default_size="128*128",
                    supported_sizes=("128*128", "160*96", "96*160", "64*64", "1280*704", "704*1280"),
                    needs_ckpt_dir=False, arch=TINY_TI2V)
