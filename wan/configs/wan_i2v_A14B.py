"""Wan2.2 I2V-A14B: T2V-A14B's two 14B experts with 36 input channels; switch at t = 900, 40 UniPC steps, shift 5,
guide (3.5, 3.5). The output size comes from the image's aspect ratio and the area of --size."""
from .model_config import A14B_I2V
from .task_config import TaskConfig

i2v_A14B = TaskConfig(name="i2v-A14B", boundary=0.900, sample_shift=5.0, sample_guide_scale=(3.5, 3.5),
                      checkpoint_name="Wan2.2-I2V-A14B", arch=A14B_I2V)
