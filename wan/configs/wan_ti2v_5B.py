"""Wan2.2 TI2V-5B: one dense 5B DiT on the Wan 2.2 VAE (z 48, 4x16x16); text-to-video, or image-to-video with
--image (the image's latent fixed as latent frame 0). 121 frames at 24 fps, 50 UniPC steps, shift 5, guide 5.0.
Its sizes are 1280*704 and 704*1280 (the reference's default 1280*720 is not one of them)."""
from .model_config import TI2V_5B
from .task_config import TaskConfig

ti2v_5B = TaskConfig(name="ti2v-5B", vae_checkpoint="Wan2.2_VAE.pth", vae_version="2.2", vae_stride=(4, 16, 16),
                     boundary=None, sample_fps=24, sample_shift=5.0, sample_steps=50, sample_guide_scale=(5.0, 5.0),
                     frame_num=121, default_size="1280*704", supported_sizes=("704*1280", "1280*704"),
                     checkpoint_name="Wan2.2-TI2V-5B", arch=TI2V_5B)
