"""Task configurations (frozen) and the sizes each task accepts. Sizes are WIDTH*HEIGHT strings, as the reference;
for the image-to-video tasks (and ti2v with an image) only their area counts (the aspect ratio comes from the
image)."""
from .task_config import TaskConfig
from .wan_i2v_A14B import i2v_A14B
from .wan_i2v_tiny import i2v_tiny
from .wan_t2v_A14B import t2v_A14B
from .wan_t2v_tiny import t2v_tiny
from .wan_ti2v_5B import ti2v_5B
from .wan_ti2v_tiny import ti2v_tiny

WAN_CONFIGS: dict[str, TaskConfig] = {"t2v-A14B": t2v_A14B, "t2v-tiny": t2v_tiny, "i2v-A14B": i2v_A14B,
                                      "i2v-tiny": i2v_tiny, "ti2v-5B": ti2v_5B, "ti2v-tiny": ti2v_tiny}

# WIDTH*HEIGHT -> (width, height)
SIZE_CONFIGS = {
    "720*1280": (720, 1280), "1280*720": (1280, 720), "480*832": (480, 832), "832*480": (832, 480),
    "704*1280": (704, 1280), "1280*704": (1280, 704),
    "128*128": (128, 128), "160*96": (160, 96), "96*160": (96, 160), "64*64": (64, 64),
}
MAX_AREA_CONFIGS = {k: w * h for k, (w, h) in SIZE_CONFIGS.items()}
SUPPORTED_SIZES = {name: cfg.supported_sizes for name, cfg in WAN_CONFIGS.items()}

__all__ = ["TaskConfig", "WAN_CONFIGS", "SIZE_CONFIGS", "MAX_AREA_CONFIGS", "SUPPORTED_SIZES"]
