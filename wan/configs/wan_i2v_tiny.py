"""The tiny built-in image-to-video model: t2v-tiny's sizes, frames and steps with i2v-A14B's boundary, shift and
guidance, on a tiny random architecture with 36 input channels, written in the official Wan2.2-I2V-A14B layout.
Its video is noise: it proves the install and the pipeline, not quality."""
from dataclasses import replace

from .model_config import TINY_I2V
from .wan_i2v_A14B import i2v_A14B
from .wan_t2v_tiny import t2v_tiny

i2v_tiny = replace(t2v_tiny, name="i2v-tiny", boundary=i2v_A14B.boundary, sample_shift=i2v_A14B.sample_shift,
                   sample_guide_scale=i2v_A14B.sample_guide_scale, checkpoint_name=i2v_A14B.checkpoint_name,
                   arch=TINY_I2V)
