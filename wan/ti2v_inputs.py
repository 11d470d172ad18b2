"""TI2V-5B's image mode inputs as the reference computes them (Wan2.2 textimage2video.py i2v(), utils.best_output_size):
the output size from the image's aspect ratio and an area, and the first frame resized (Pillow LANCZOS on the uint8
image) and centre-cropped to it, as a [-1, 1] tensor.

Sizes are multiples of dw = dh = patch * VAE stride = 32 pixels. Shapes: image [3, H, W]; video (oh, ow); latent
grid oh/16 x ow/16.
"""
from __future__ import annotations

import math

import torch

from .image_condition import I2VGeometry, image_to_tensor
from .modules.rope import MAX_POSITIONS


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """(ow, oh): the reference's choice between flooring the width first and flooring the height first (each side a
    multiple of dw / dh, area at most expected_area), keeping the one whose aspect ratio is closer to w / h (ties go
    to height first). Python float arithmetic, as the reference."""
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)  # width first
    oh1 = int(expected_area / ow1 // dh * dh) if ow1 else 0
    oh2 = int(oh // dh * dh)  # height first
    ow2 = int(expected_area / oh2 // dw * dw) if oh2 else 0
    if min(ow1, oh1, ow2, oh2) <= 0:
        raise ValueError(f"an image of {w}x{h} has no {dw}x{dh}-aligned size within an area of {expected_area}: its "
                         "aspect ratio is too extreme; crop the image")
    r1, r2 = ow1 / oh1, ow2 / oh2
    if max(ratio / r1, r1 / ratio) < max(ratio / r2, r2 / ratio):
        return ow1, oh1
    return ow2, oh2


def ti2v_geometry(image_w: int, image_h: int, max_area: int, vae_stride=(4, 16, 16), patch_size=(1, 2, 2)
                  ) -> I2VGeometry:
    """The video size for an image at `max_area` (only the area counts; the aspect ratio is the image's). Raises
    ValueError for an aspect ratio with no aligned size, or one whose side is longer than the DiT's RoPE table."""
    if image_w < 1 or image_h < 1 or max_area < 1:
        raise ValueError(f"image size {image_w}x{image_h} and area {max_area} must be positive")
    dh, dw = patch_size[1] * vae_stride[1], patch_size[2] * vae_stride[2]
    ow, oh = best_output_size(image_w, image_h, dw, dh, max_area)
    geo = I2VGeometry(oh // vae_stride[1], ow // vae_stride[2], oh, ow)
    if geo.lat_h // patch_size[1] > MAX_POSITIONS or geo.lat_w // patch_size[2] > MAX_POSITIONS:
        raise ValueError(f"an image of {image_w}x{image_h} gives a {geo.describe()} video at area {max_area}: a side "
                         f"is longer than the DiT's RoPE table ({MAX_POSITIONS} patches); crop the image")
    return geo


def resize_and_crop(img, width: int, height: int):
    """A PIL image scaled (LANCZOS, on its uint8 pixels) so that it covers width x height, then centre-cropped to
    it: scale = max(width / W, height / H), size (round(W * scale), round(H * scale)), crop offsets floored."""
    from PIL import Image

    iw, ih = img.size
    scale = max(width / iw, height / ih)
    img = img.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1, y1 = (img.width - width) // 2, (img.height - height) // 2
    img = img.crop((x1, y1, x1 + width, y1 + height))
    if img.size != (width, height):  # cannot happen for scale >= the needed one; checked as the reference asserts
        raise ValueError(f"resizing to {width}x{height} gave {img.width}x{img.height}")
    return img


def first_frame(img, geo: I2VGeometry) -> torch.Tensor:
    """The video's first frame from an RGB PIL image: [3, 1, h, w] float32 in [-1, 1] (to_tensor, then (x - 0.5) / 0.5),
    what the reference's VAE encodes."""
    return image_to_tensor(resize_and_crop(img, geo.width, geo.height)).unsqueeze(1)


def seq_len_for(frame_num: int, lat_h: int, lat_w: int, vae_stride=(4, 16, 16), patch_size=(1, 2, 2),
                sp_size: int = 1) -> int:
    """The DiT's token count F' * lat_h * lat_w / 4, rounded up to a multiple of the sequence-parallel degree."""
    tokens = ((frame_num - 1) // vae_stride[0] + 1) * lat_h * lat_w // (patch_size[1] * patch_size[2])
    return int(math.ceil(tokens / sp_size)) * sp_size
