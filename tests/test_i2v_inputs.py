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

from i2v_reference import RefEncoder, ref_geometry, ref_image_tensor, ref_mask
from wan.image_condition import (condition_video, first_frame_mask, i2v_geometry, image_to_tensor,
                                 resize_first_frame, seq_len_for)
from wan.modules.vae import Wan2_1_VAE
from wan.testing.tiny_vae import write_tiny_vae_checkpoint


# ---- geometry ---------------------------------------------------------------------------------------------------
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
    assert x.shape == (3, 23, 37) and x.dtype == torch.float32 and torch.equal(x, ref_image_tensor(img))
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
    mask = first_frame_mask(frames, lat_h, lat_w)
    assert mask.shape == (4, (frames - 1) // 4 + 1, lat_h, lat_w) and torch.equal(mask, ref_mask(frames, lat_h, lat_w))
    with pytest.raises(ValueError, match="4n\\+1"):
        first_frame_mask(frames + 1, lat_h, lat_w)


def test_condition_video_is_the_frame_then_black_frames():
    first = torch.randn(3, 16, 24)
    video = condition_video(first, 9)
    assert video.shape == (3, 9, 16, 24) and torch.equal(video[:, 0], first) and not video[:, 1:].any()


# ---- the VAE encoder, re-computed from the original state dict (wan22_reference.md §5) ----------------------------
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


@pytest.mark.parametrize("frames", [5, 45])
def test_encode_reusing_repeated_chunks_is_bit_for_bit(tiny_vae, frames):
    """vae_encode.encode_mean (what fast_encode runs): the plain encode's latent, torch.equal, with fewer layers run
    once the black frames' inputs repeat; a video without repeats runs every layer."""
    from wan.modules.vae_encode import encode_mean

    vae = tiny_vae[0]
    video = condition_video(resize_first_frame(image_to_tensor(_image(40, 30, seed=frames)), 16, 16), frames)
    stats = {}
    with torch.no_grad():
        plain = vae.model.encode(video[None]).latent_dist.mode()
        reused = encode_mean(vae.model, video[None], stats)
    assert torch.equal(reused, plain) and stats["chunks"] == (frames - 1) // 4 + 1
    if frames == 5:  # through the wrapper (normalised), and a video without repeats runs every layer
        assert torch.equal(vae.encode([video], reuse_repeats=True)[0], vae.encode([video])[0])
        noisy = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        stats = {}
        with torch.no_grad():
            assert torch.equal(encode_mean(vae.model, noisy, stats), vae.model.encode(noisy).latent_dist.mode())
        assert stats["computed"] == [stats["layers"]] * 3
    else:  # chunks 0-2 run every layer; then the settled prefix grows (at 81 frames 14 -> 2 of the 14 layers)
        assert stats["computed"][:3] == [stats["layers"]] * 3 and stats["computed"][-1] < stats["layers"] // 2
