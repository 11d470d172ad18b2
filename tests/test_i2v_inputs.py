"""Image-to-video inputs against an independent re-computation written from the facts file (i2v_ti2v_facts.md §1;
the VAE from wan22_reference.md §5), not from wan/: the geometry over a sweep of image sizes and areas, the image
tensor, the bicubic stretch, the first-frame mask, and the VAE encoder (the condition's latent) from the raw
original-layout state dict, bit for bit."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wan.image_condition import (condition_video, first_frame_mask, i2v_geometry, image_to_tensor,
                                 resize_first_frame, seq_len_for)
from wan.modules.vae import WAN21_VAE_MEAN, WAN21_VAE_STD, Wan2_1_VAE
from wan.testing.tiny_vae import write_tiny_vae_checkpoint


# ---- geometry: the reference's formula, with numpy as it computes it ------------------------------------------------
def ref_geometry(w, h, area):
    ar = h / w
    lat_h = round(np.sqrt(area * ar) // 8 // 2 * 2)
    lat_w = round(np.sqrt(area / ar) // 8 // 2 * 2)
    return lat_h, lat_w


@pytest.mark.parametrize("image,area,video_hw", [
    ((1280, 720), 1280 * 720, (720, 1280)), ((1280, 720), 832 * 480, (464, 832)),
    ((832, 1104), 1280 * 720, (1104, 832)), ((832, 1104), 832 * 480, (720, 544)),
    ((1024, 1024), 1280 * 720, (960, 960)), ((1024, 1024), 832 * 480, (624, 624))])
def test_geometry_table_of_the_facts_file(image, area, video_hw):
    geo = i2v_geometry(*image, area)
    assert (geo.height, geo.width) == video_hw and (geo.lat_h, geo.lat_w) == (video_hw[0] // 8, video_hw[1] // 8)


def test_geometry_sweep_matches_the_reference_formula():
    rng = np.random.default_rng(0)
    sides = np.unique(np.concatenate([rng.integers(16, 4001, 300), [16, 17, 64, 127, 720, 1280, 1920, 4000]]))
    areas = [1280 * 720, 832 * 480, 128 * 128, 64 * 64, 160 * 96]
    checked = 0
    for area in areas:
        for w in sides[::3]:
            for h in sides[1::3]:
                want = ref_geometry(int(w), int(h), area)
                if min(want) < 2 or max(want) > 2048:  # refused (below one patch / past the RoPE table)
                    with pytest.raises(ValueError, match="crop the image"):
                        i2v_geometry(int(w), int(h), area)
                    continue
                geo = i2v_geometry(int(w), int(h), area)
                assert (geo.lat_h, geo.lat_w) == want, (w, h, area)
                assert geo.lat_h % 2 == 0 and geo.lat_w % 2 == 0 and geo.height * geo.width <= area
                checked += 1
    assert checked > 10000
    # only the area counts: the orientation of --size does not
    assert i2v_geometry(640, 480, 1280 * 720) == i2v_geometry(640, 480, 720 * 1280)


def test_seq_len_is_the_exact_token_count():
    geo = i2v_geometry(832, 1104, 1280 * 720)
    assert seq_len_for(81, geo) == 75348  # the facts file's example image at 720p (t2v: 75600)
    assert seq_len_for(81, geo, sp_size=8) == 75352


# ---- image tensor, bicubic stretch, mask -------------------------------------------------------------------------
def _image(w=37, h=23, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_image_tensor_is_to_tensor_then_minus_one_to_one():
    img = _image()
    x = image_to_tensor(img)
    want = (np.asarray(img).astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    assert x.shape == (3, 23, 37) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(want).permute(2, 0, 1))
    with pytest.raises(ValueError, match="RGB"):
        image_to_tensor(img.convert("RGBA"))


def _cubic(t, a=-0.75):
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _bicubic_matrix(n_in, n_out):
    """[n_out, n_in] float64: align_corners=False source coordinates, 4 taps of the a=-0.75 kernel, the edge pixel
    repeated outside the image (no antialias)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for k in range(-1, 3):
            m[i, min(max(base + k, 0), n_in - 1)] += _cubic(src - (base + k))
    return m


def test_bicubic_stretch_matches_a_float64_bicubic_and_keeps_overshoot():
    img = _image(37, 23, seed=1)
    x = image_to_tensor(img)
    out = resize_first_frame(x, 48, 64)
    ref = np.einsum("oh,chw,pw->cop", _bicubic_matrix(23, 48), x.double().numpy(), _bicubic_matrix(37, 64))
    assert out.shape == (3, 48, 64) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert np.abs(out.double().numpy() - ref).max() < 1e-5  # fp32 weights and sums: ~25 ulps of 1.2
    assert out.max() > 1.0 and out.min() < -1.0  # no clamp: the overshoot of a noisy image stays
    assert torch.equal(out, F.interpolate(x[None], size=(48, 64), mode="bicubic", align_corners=False)[0])


@pytest.mark.parametrize("frames", [1, 5, 17, 81])
def test_mask_matches_the_reference_construction(frames):
    lat_h, lat_w = 6, 10
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.cat([msk[:, :1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]
    mask = first_frame_mask(frames, lat_h, lat_w)
    assert mask.shape == (4, (frames - 1) // 4 + 1, lat_h, lat_w) and torch.equal(mask, msk)
    with pytest.raises(ValueError, match="4n\\+1"):
        first_frame_mask(frames + 1, lat_h, lat_w)


def test_condition_video_is_the_frame_then_black_frames():
    first = torch.randn(3, 16, 24)
    video = condition_video(first, 9)
    assert video.shape == (3, 9, 16, 24) and torch.equal(video[:, 0], first) and not video[:, 1:].any()


# ---- the VAE encoder, re-computed from the original state dict (wan22_reference.md §5) ----------------------------
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


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    write_tiny_vae_checkpoint(str(path), seed=4, base_dim=8)
    return Wan2_1_VAE(vae_pth=str(path), device="cpu"), torch.load(path, weights_only=True)


@pytest.mark.parametrize("frames,hw", [(1, (32, 48)), (5, (32, 48)), (9, (48, 32)), (17, (16, 16))])
def test_encode_matches_the_independent_encoder_bit_for_bit(tiny_vae, frames, hw):
    vae, sd = tiny_vae
    first = resize_first_frame(image_to_tensor(_image(40, 30, seed=frames)), *hw)
    video = condition_video(first, frames)  # the I2V input: one frame, then black frames
    (ours,) = vae.encode([video])
    ref = RefEncoder(sd).encode(video)
    assert ours.shape == (16, (frames - 1) // 4 + 1, hw[0] // 8, hw[1] // 8)
    assert torch.equal(ours, ref), (ours - ref).abs().max()
    if frames > 1:  # the causal caches carry the first frame into the black frames' latents: no shortcut
        (black,) = vae.encode([torch.zeros_like(video)])
        assert (ours[:, 1:] - black[:, 1:]).abs().max() > 1e-2
