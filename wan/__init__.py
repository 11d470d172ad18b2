"""Wan 2.2 text-to-video (T2V-A14B), image-to-video (I2V-A14B) and text-image-to-video (TI2V-5B): a faithful, fast
re-implementation.

`wan.WanT2V`, `wan.WanI2V` and `wan.WanTI2V` are the pipelines, as in the reference (imported lazily, so `import wan`
stays light).
"""

__all__ = ["WanT2V", "WanI2V", "WanTI2V"]


def __getattr__(name):
    if name == "WanT2V":
        from .text2video import WanT2V

        return WanT2V
    if name == "WanI2V":
        from .image2video import WanI2V

        return WanI2V
    if name == "WanTI2V":
        from .textimage2video import WanTI2V

        return WanTI2V
    raise AttributeError(f"module 'wan' has no attribute {name!r}")
