"""An independent re-computation of the image-to-video inputs, written from the facts files (i2v_ti2v_facts.md §1;
wan22_reference.md §5 for the VAE), not from wan/: shared by tests/test_i2v_inputs.py and tests/test_i2v_pipeline.py.
"""
import numpy as np
import torch
import torch.nn.functional as F

from wan.modules.vae import WAN21_VAE_MEAN, WAN21_VAE_STD


def ref_geometry(w, h, area):
    """(lat_h, lat_w) of a w x h image at `area`: numpy float64 square roots and floor divisions."""
    ar = h / w
    lat_h = round(np.sqrt(area * ar) // 8 // 2 * 2)
    lat_w = round(np.sqrt(area / ar) // 8 // 2 * 2)
    return lat_h, lat_w


def ref_image_tensor(img) -> torch.Tensor:
    """PIL RGB -> [3, H, W] fp32 in [-1, 1]: uint8 / 255, then (x - 0.5) / 0.5."""
    x = (np.asarray(img).astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(x).permute(2, 0, 1)


def ref_mask(frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """The reference's construction: ones, zero after frame 0, frame 0 repeated 4 times, 4 frames per latent frame."""
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.cat([msk[:, :1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)
    return msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]


def ref_condition(img, frames: int, area: int, vae_sd: dict) -> torch.Tensor:
    """y [20, F', lat_h, lat_w]: the mask, then the normalised VAE mean of [the stretched image, black frames]."""
    lat_h, lat_w = ref_geometry(*img.size, area)
    first = F.interpolate(ref_image_tensor(img)[None], size=(8 * lat_h, 8 * lat_w), mode="bicubic")[0]
    video = torch.cat([first[:, None], torch.zeros(3, frames - 1, 8 * lat_h, 8 * lat_w)], dim=1)
    return torch.cat([ref_mask(frames, lat_h, lat_w), RefEncoder(vae_sd).encode(video)])


class RefEncoder:
    """The Wan 2.1 VAE encode: chunks of 1 then 4 frames; each causal 3x3x3 conv keeps its last 2 input frames as
    the next chunk's front padding; downsample3d keeps 1 frame and skips its time conv on the first chunk."""

    def __init__(self, sd):
        self.sd = sd
        self.cache = {}

    def conv(self, name, x):  # causal conv (k=3 padded 1 in h, w; 2 frames in front from the cache) or 1x1x1
        w, b = self.sd[name + ".weight"], self.sd[name + ".bias"]
        if w.shape[2] == 1:
            return F.conv3d(x, w, b)
        old = self.cache.get(name)
        new = x[:, :, -2:].clone()
        if new.shape[2] < 2 and old is not None:
            new = torch.cat([old[:, :, -1:], new], dim=2)
        self.cache[name] = new
        front = 2
        if old is not None:
            x, front = torch.cat([old, x], dim=2), 2 - old.shape[2]
        return F.conv3d(F.pad(x, (1, 1, 1, 1, front, 0)), w, b)

    def rms(self, name, x):
        return F.normalize(x, dim=1) * x.shape[1] ** 0.5 * self.sd[name + ".gamma"] + 0.0

    def res(self, p, x):
        h = self.conv(p + ".shortcut", x) if p + ".shortcut.weight" in self.sd else x
        x = self.conv(p + ".residual.2", F.silu(self.rms(p + ".residual.0", x)))
        x = self.conv(p + ".residual.6", F.silu(self.rms(p + ".residual.3", x)))
        return x + h

    def down(self, p, x, temporal):
        b, t = x.shape[0], x.shape[2]
        y = x.transpose(1, 2).flatten(0, 1)
        y = F.conv2d(F.pad(y, (0, 1, 0, 1)), self.sd[p + ".resample.1.weight"], self.sd[p + ".resample.1.bias"],
                     stride=2)
        x = y.unflatten(0, (b, t)).transpose(1, 2)
        if temporal:
            old = self.cache.get(p)
            self.cache[p] = x[:, :, -1:].clone()
            if old is not None:
                x = F.conv3d(torch.cat([old[:, :, -1:], x], dim=2), self.sd[p + ".time_conv.weight"],
                             self.sd[p + ".time_conv.bias"], stride=(2, 1, 1))
        return x

    def attn(self, p, x):
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).flatten(0, 1)
        y = F.normalize(y, dim=1) * c ** 0.5 * self.sd[p + ".norm.gamma"]
        q, k, v = F.conv2d(y, self.sd[p + ".to_qkv.weight"], self.sd[p + ".to_qkv.bias"]).reshape(
            b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous().chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        y = F.conv2d(y, self.sd[p + ".proj.weight"], self.sd[p + ".proj.bias"])
        return y.unflatten(0, (b, t)).transpose(1, 2) + x

    def chunk(self, x):
        x = self.conv("encoder.conv1", x)
        # base 1,1 | 2,2 | 4,4 | 4,4 (x base_dim); downsample2d after the first level, downsample3d after the next two
        for i in range(11):
            p = f"encoder.downsamples.{i}"
            if i in (2, 5, 8):
                x = self.down(p, x, temporal=i != 2)
            else:
                x = self.res(p, x)
        x = self.res("encoder.middle.2", self.attn("encoder.middle.1", self.res("encoder.middle.0", x)))
        return self.conv("encoder.head.2", F.silu(self.rms("encoder.head.0", x)))

    def encode(self, video):
        """[3, T, H, W] -> normalised mu [16, 1 + (T-1)//4, H/8, W/8]."""
        x = video[None]
        out = [self.chunk(x[:, :, :1])] + [self.chunk(x[:, :, 1 + 4 * i:5 + 4 * i])
                                           for i in range((x.shape[2] - 1) // 4)]
        mu = F.conv3d(torch.cat(out, dim=2), self.sd["conv1.weight"], self.sd["conv1.bias"])[0, :16]
        mean, std = torch.tensor(WAN21_VAE_MEAN), torch.tensor(WAN21_VAE_STD)
        return (mu - mean.view(-1, 1, 1, 1)) * (1.0 / std).view(-1, 1, 1, 1)
