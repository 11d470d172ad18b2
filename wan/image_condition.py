"""Image-to-video inputs as the reference computes them (Wan2.2 image2video.py): the output geometry from the image's
aspect ratio and an area, the first frame as a [-1, 1] tensor stretched to that size, and the 4-channel first-frame
mask. `WanI2V.condition` joins the mask to the VAE latent of [first frame, F - 1 black frames] to make `y`.

Shapes: image [3, H, W]; F frames; F' = (F - 1) / 4 + 1 latent frames; latent grid lat_h x lat_w = h/8 x w/8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .modules.rope import MAX_POSITIONS

MASK_CHANNELS = 4  # the VAE packs 4 frames per latent frame: one mask channel per packed frame


@dataclass(frozen=True)
class I2VGeometry:
    lat_h: int
    lat_w: int
    height: int  # video height = 8 * lat_h
    width: int

    def describe(self) -> str:
        return f"{self.width}x{self.height}"


def i2v_geometry(image_w: int, image_h: int, max_area: int, vae_stride=(4, 8, 8), patch_size=(1, 2, 2)
                 ) -> I2VGeometry:
    """The reference's output size: only `max_area` counts, the aspect ratio is the image's (h / w), and each latent
    side is floored to a multiple of the patch size. float64 square roots and floor divisions, as numpy does them.
    Raises ValueError when a side falls below one patch or past the DiT's RoPE table (an extreme aspect ratio)."""
    if image_w < 1 or image_h < 1 or max_area < 1:
        raise ValueError(f"image size {image_w}x{image_h} and area {max_area} must be positive")
    _, sh, sw = vae_stride
    _, ph, pw = patch_size
    aspect = image_h / image_w
    lat_h = round(np.sqrt(max_area * aspect) // sh // ph * ph)  # numpy float64 throughout, as the reference
    lat_w = round(np.sqrt(max_area / aspect) // sw // pw * pw)
    geo = I2VGeometry(lat_h, lat_w, lat_h * sh, lat_w * sw)
    if lat_h < ph or lat_w < pw:
        raise ValueError(f"an image of {image_w}x{image_h} gives a {geo.describe()} video at area {max_area}: its "
                         f"aspect ratio is too extreme (a side under {max(ph * sh, pw * sw)} pixels); crop the image")
    if lat_h // ph > MAX_POSITIONS or lat_w // pw > MAX_POSITIONS:
        raise ValueError(f"an image of {image_w}x{image_h} gives a {geo.describe()} video at area {max_area}: a side "
                         f"is longer than the DiT's RoPE table ({MAX_POSITIONS} patches); crop the image")
    return geo


def image_to_tensor(img) -> torch.Tensor:
    """An RGB PIL image -> [3, H, W] float32 in [-1, 1]: uint8 / 255 (torchvision's to_tensor), then (x - 0.5) / 0.5."""
    if getattr(img, "mode", None) != "RGB":
        raise ValueError(f"the image must be an RGB PIL image, got {getattr(img, 'mode', type(img).__name__)!r}; "
                         "pass img.convert('RGB')")
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return x.to(torch.float32).div(255).sub_(0.5).div_(0.5)


def resize_first_frame(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, H, W] -> [3, h, w]: the whole image stretched (no crop), torch bicubic, align_corners False, no antialias,
    fp32 on the CPU (where the reference runs it, even on GPU runs), no clamp (overshoot past [-1, 1] stays)."""
    image = image.detach().to("cpu", torch.float32)
    return F.interpolate(image[None], size=(height, width), mode="bicubic")[0]


def first_frame_mask(frame_num: int, lat_h: int, lat_w: int, device=None) -> torch.Tensor:
    """[4, F', lat_h, lat_w] float32: ones on latent frame 0, zeros elsewhere. Channel j is packed frame j of a latent
    frame (the reference repeats frame 0's mask 4 times so every latent frame packs 4 mask frames)."""
    if frame_num < 1 or (frame_num - 1) % 4:
        raise ValueError(f"frame_num must be 4n+1, got {frame_num}")
    mask = torch.zeros(MASK_CHANNELS, (frame_num - 1) // 4 + 1, lat_h, lat_w, dtype=torch.float32, device=device)
    mask[:, 0] = 1
    return mask


def condition_video(first: torch.Tensor, frame_num: int, device=None) -> torch.Tensor:
    """[3, h, w] first frame -> [3, F, h, w]: the frame, then F - 1 black (zero) frames, on `device`; what the VAE
    encodes (all F frames: its causal caches carry the first frame into the zero frames' latents)."""
    video = torch.zeros(3, frame_num, *first.shape[1:], dtype=torch.float32, device=device)
    video[:, 0] = first.to(video.device)
    return video


def seq_len_for(frame_num: int, geo: I2VGeometry, vae_stride=(4, 8, 8), patch_size=(1, 2, 2), sp_size: int = 1
                ) -> int:
    """The DiT's token count F' * lat_h * lat_w / 4, rounded up to a multiple of the sequence-parallel degree."""
    tokens = ((frame_num - 1) // vae_stride[0] + 1) * geo.lat_h * geo.lat_w // (patch_size[1] * patch_size[2])
    return int(math.ceil(tokens / sp_size)) * sp_size
