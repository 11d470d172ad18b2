"""An independent re-computation of TI2V-5B's inputs, its Wan 2.2 VAE encode and its sampling loop, written from the
facts file (i2v_ti2v_facts.md §2 and §3), not from wan/: shared by tests/test_ti2v_*.py.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from i2v_reference import RefEncoder
from wan.modules.vae2_2 import WAN22_VAE_MEAN, WAN22_VAE_STD
from wan.utils.schedulers import build_scheduler


def ref_best_output_size(w, h, dw, dh, area):
    """§2 i2v 1: floor the width first or the height first (multiples of dw / dh, area at most `area`), keep the
    candidate whose aspect ratio is closer to w / h (the larger of the two ratios' quotients, smaller wins)."""
    ratio = w / h
    ow, oh = (area * ratio) ** 0.5, area / (area * ratio) ** 0.5
    cands = []
    for first in ("w", "h"):
        if first == "w":
            a = int(ow // dw * dw)
            b = int(area / a // dh * dh)
            cands.append((a, b))
        else:
            b = int(oh // dh * dh)
            a = int(area / b // dw * dw)
            cands.append((a, b))
    off = [max(ratio / (a / b), (a / b) / ratio) for a, b in cands]
    return cands[0] if off[0] < off[1] else cands[1]


def ref_first_frame(img, ow, oh):
    """§2 i2v 1: LANCZOS to (round(W * s), round(H * s)) with s = max(ow / W, oh / H), centre crop at floored offsets,
    uint8 / 255, (x - 0.5) / 0.5 -> [3, 1, oh, ow]."""
    iw, ih = img.size
    s = max(ow / iw, oh / ih)
    big = img.resize((round(iw * s), round(ih * s)), Image.LANCZOS)
    x0, y0 = (big.width - ow) // 2, (big.height - oh) // 2
    arr = np.asarray(big, dtype=np.float32)[y0:y0 + oh, x0:x0 + ow]
    x = (arr / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[:, None]


class RefEncoder22(RefEncoder):
    """§3: the Wan 2.2 encoder on the original keys: 2x2 patchify to 12 channels (channel c * 4 + r * 2 + q, r the
    column offset), four levels of 2 residual blocks, a down Resample on levels 0-2 (in time too on 1 and 2) and an
    average shortcut on every level; middle, head, chunks of 1 then 4 frames; mu = the first 48 of conv1's output."""

    TIME_DOWN = (False, True, True)

    @staticmethod
    def patchify(x):
        b, c, f, h, w = x.shape
        x = x.reshape(b, c, f, h // 2, 2, w // 2, 2)  # [b, c, f, h, q, w, r]
        return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * 4, f, h // 2, w // 2)

    @staticmethod
    def avg_down(x, ft, fs, out_ch):
        """Pad time in front to a multiple of ft, fold the (ft, fs, fs) neighbourhood into channels after each
        channel, average groups of consecutive channels down to out_ch."""
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, out_ch, c * ft * fs * fs // out_ch, t // ft, h // fs, w // fs)
        return x.mean(dim=2)

    def chunk(self, x):
        x = self.conv("encoder.conv1", x)
        for i in range(4):
            p = f"encoder.downsamples.{i}.downsamples"
            skip = x
            x = self.res(f"{p}.1", self.res(f"{p}.0", x))
            temporal = i < 3 and self.TIME_DOWN[i]
            if i < 3:
                x = self.down(f"{p}.2", x, temporal)
            out_ch = self.sd[f"{p}.1.residual.6.weight"].shape[0]
            x = x + self.avg_down(skip, 2 if temporal else 1, 2 if i < 3 else 1, out_ch)
        x = self.res("encoder.middle.2", self.attn("encoder.middle.1", self.res("encoder.middle.0", x)))
        return self.conv("encoder.head.2", F.silu(self.rms("encoder.head.0", x)))

    def encode(self, video):
        """[3, T, H, W] -> normalised mu [48, 1 + (T-1)//4, H/16, W/16]."""
        x = self.patchify(video[None])
        out = [self.chunk(x[:, :, :1])] + [self.chunk(x[:, :, 1 + 4 * i:5 + 4 * i])
                                           for i in range((x.shape[2] - 1) // 4)]
        mu = F.conv3d(torch.cat(out, dim=2), self.sd["conv1.weight"], self.sd["conv1.bias"])[0, :48]
        mean, std = torch.tensor(WAN22_VAE_MEAN), torch.tensor(WAN22_VAE_STD)
        return (mu - mean.view(-1, 1, 1, 1)) * (1.0 / std).view(-1, 1, 1, 1)


def ref_timesteps(t, lat_f, lat_h, lat_w, seq_len, image: bool):
    """§2 t2v / i2v 5: per-token timesteps [1, seq_len] float32: mask (0 on latent frame 0 with an image, else 1)
    sampled every second row and column, times t, then padded with t."""
    mask = torch.ones(lat_f, lat_h, lat_w)
    if image:
        mask[0] = 0
    ts = (mask[:, ::2, ::2] * t).flatten()
    return torch.cat([ts, ts.new_ones(seq_len - ts.numel()) * t])[None]


def ref_loop(pipe, ctx, shape, seq_len, steps, shift, guide, seed, solver="unipc", z=None, noise_first=False):
    """The §2 loop with the pipeline's DiT and scheduler tables: [(x, t [1, L]) per DiT call], final latent.
    z (image mode): latent frame 0 = z before the loop and after every step, by the mask formula."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(*shape, generator=g)
    mask = torch.ones(shape)
    if z is not None:
        mask[:, 0] = 0
        latent = (1.0 - mask) * z + mask * latent
    scheduler, timesteps = build_scheduler(solver, steps, shift, "cpu", 1000)
    calls = []
    with torch.no_grad():
        for t in timesteps:
            tt = ref_timesteps(t, *shape[1:], seq_len, z is not None)
            cond, uncond = (pipe.model([latent], t=tt, context=[c], seq_len=seq_len)[0] for c in ctx)
            calls += [(latent.clone(), tt, c) for c in ctx]
            latent = scheduler.step((uncond + guide * (cond - uncond))[None], t, latent[None], return_dict=False)[0][0]
            if z is not None:
                latent = (1.0 - mask) * z + mask * latent
    return calls, latent
