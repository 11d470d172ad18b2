"""A tiny built-in model with the same code path: random weights, written in the official layout, CPU-fast.

Its video is noise: it proves the install and the pipeline, not quality.
"""
from .model_config import TINY
from .task_config import TaskConfig

t2v_tiny = TaskConfig(
    name="t2v-tiny", text_len=512, sample_steps=8, frame_num=17, default_size="128*128",
    supported_sizes=("128*128", "160*96", "96*160", "64*64", "832*480", "480*832"), needs_ckpt_dir=False, arch=TINY)
