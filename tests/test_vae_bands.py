"""Banded Wan 2.1 VAE decode (wan/modules/vae_bands.py) against diffusers' whole-frame decode, CPU only.

A tiny random VAE (base_dim 8, realistic random weights) loaded through the real original-layout checkpoint path;
latent [16, 3, 40, 1] -> video [3, 9, 320, 8]: 40..320 rows at the split resolutions, so bands have real interiors
for every split (halo 13..7 rows), and 3 latent frames run the first-chunk ('Rep') and the steady cache paths.
"""
import pytest
import torch

import wan.modules.vae as vae_module
from wan.modules.vae import WAN21_VAE_MEAN, WAN21_VAE_STD, Wan2_1_VAE
from wan.modules.vae_bands import DEFAULT_BAND_SPLIT, _band_plan, decode_banded, halo_rows
from wan.testing.tiny_vae import write_tiny_vae_checkpoint

SPLITS = [0, 1, 2, 3]
# fp32: the same ops on band-shaped tensors; CPU conv kernels block their sums by shape, so some results differ in
# the last bits (measured on this CPU: bit for bit for splits 0 and 3 and for 2 bands, else <= 1.2e-6).
FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae_bands") / "tiny_vae.pth"
    write_tiny_vae_checkpoint(path, seed=0, base_dim=8)
    return str(path)


@pytest.fixture(scope="module")
def vae32(ckpt):
    return Wan2_1_VAE(vae_pth=ckpt, device="cpu")


@pytest.fixture(scope="module")
def vae16(ckpt):
    return Wan2_1_VAE(vae_pth=ckpt, dtype=torch.bfloat16, device="cpu")


def latent(t=3, h=40, w=1, seed=0):
    """An un-normalised latent [1, 16, t, h, w], as Wan2_1_VAE.decode hands it to model.decode."""
    z = torch.randn(16, t, h, w, generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(WAN21_VAE_MEAN), torch.tensor(WAN21_VAE_STD)
    return (z * std.view(-1, 1, 1, 1) + mean.view(-1, 1, 1, 1))[None]


def whole(model, z):
    with torch.no_grad():
        return model.decode(z).sample


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def ref32(vae32):
    z = latent()
    return z, whole(vae32.model, z)


@pytest.mark.parametrize("split", SPLITS)
def test_banded_equals_whole_fp32(vae32, ref32, split):
    z, ref = ref32
    assert ref.shape == (1, 3, 9, 320, 8) and ref.std() > 0.1 and (ref.abs() < 1).float().mean() > 0.5
    for bands in (2, 3, 5):
        out = decode_banded(vae32.model, z, bands, split)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert max_err(out, ref) <= FP32_TOL, (split, bands)


def test_bands_beyond_rows_are_clamped(vae32):
    z = latent(t=2, h=6, seed=1)  # split 0: 6 rows -> at most 6 bands of one row each
    assert len(_band_plan(6, 50, halo_rows(vae32.model.decoder, 0))) == 6
    assert max_err(decode_banded(vae32.model, z, 50, split=0), whole(vae32.model, z)) <= FP32_TOL
    with pytest.raises(ValueError, match="bands >= 1"):
        decode_banded(vae32.model, z, 0)


def test_band_plan_is_even_and_covers_the_rows():
    plan = _band_plan(10, 3, halo=2)
    assert plan == [(0, 3, 0, 5), (3, 6, 1, 8), (6, 10, 4, 10)]


@pytest.mark.parametrize("split", SPLITS)
def test_banded_equals_whole_bf16(vae16, split):
    # bf16: the same op sequence on other shapes, accumulated in fp32 and rounded to bf16 after each layer; a sum
    # that lands on the other side of a rounding boundary flips one bf16 ulp (2^-8 relative) and later layers carry
    # it along. 2 ulps at |x| ~ 1 (1/64) stays well below the bf16-vs-fp32 gap (~0.1 here). Measured on CPU: 0.
    z = latent().bfloat16()
    ref = whole(vae16.model, z)
    out = decode_banded(vae16.model, z, 3, split)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert max_err(out, ref) <= 1 / 64


def test_halo_rows_from_the_architecture(vae32):
    # 6 radius-1 convs per up block, x2 per upsample (+1 for its conv), +1 for conv_out, in output rows:
    # split 3: 7 -> 7; split 2: 2*(6)+1+7 = 20 -> 10; split 1: 46 -> 12; split 0: 98 -> 13 (rounded up).
    assert [halo_rows(vae32.model.decoder, s) for s in SPLITS] == [13, 12, 10, 7]


@pytest.mark.parametrize("split", SPLITS)
def test_halo_matters_and_halo_rows_suffices(vae32, ref32, split):
    z, ref = ref32
    model, needed = vae32.model, halo_rows(vae32.model.decoder, split)
    assert max_err(decode_banded(model, z, 2, split, halo=0), ref) > 1e-2  # no halo: visible seam
    assert max_err(decode_banded(model, z, 2, split, halo=needed), ref) <= FP32_TOL
    smallest = needed  # walk down while still exact: the empirical minimum, never above the derived one
    while smallest > 0 and max_err(decode_banded(model, z, 2, split, halo=smallest - 1), ref) <= FP32_TOL:
        smallest -= 1
    assert 0 < smallest <= needed


def test_single_latent_frame(vae32):
    z = latent(t=1, seed=2)
    ref = whole(vae32.model, z)
    out = decode_banded(vae32.model, z, 4)
    assert out.shape == ref.shape == (1, 3, 1, 320, 8)
    assert max_err(out, ref) <= FP32_TOL


def test_wrapper_routes_by_decode_bands(ckpt, vae32, monkeypatch):
    calls = []

    def spy(model, z, bands, *args, **kwargs):
        calls.append(bands)
        return decode_banded(model, z, bands, *args, **kwargs)

    monkeypatch.setattr(vae_module, "decode_banded", spy)
    zn = torch.randn(16, 3, 40, 1, generator=torch.Generator().manual_seed(3))  # normalised, as the pipeline has
    mean, std = torch.tensor(WAN21_VAE_MEAN).view(-1, 1, 1, 1), torch.tensor(WAN21_VAE_STD).view(-1, 1, 1, 1)
    ref = whole(vae32.model, (zn / (1.0 / std) + mean)[None])[0]

    assert vae32.decode_bands == 0
    (plain,) = vae32.decode([zn])
    assert calls == [] and torch.equal(plain, ref)  # the original whole-frame path
    (one,) = Wan2_1_VAE(vae_pth=ckpt, device="cpu", decode_bands=1).decode([zn])
    assert calls == [] and torch.equal(one, ref)

    banded_vae = Wan2_1_VAE(vae_pth=ckpt, device="cpu", decode_bands=3)
    (banded,) = banded_vae.decode([zn])
    assert calls == [3] and banded.shape == ref.shape and max_err(banded, ref) <= FP32_TOL
    with pytest.raises(ValueError, match="decode_bands"):
        Wan2_1_VAE(vae_pth=ckpt, device="cpu", decode_bands=-1)


@pytest.mark.parametrize("split", SPLITS)
def test_band_order_equals_whole_fp32(vae32, ref32, split):
    # same tolerance as the frame order: band-shaped convs (measured: bit for bit for 2 bands and split 3, else
    # <= 1.3e-6); the crops and the frame-at-a-time tail change only the shapes, not the values
    z, ref = ref32
    for bands in (2, 3, 5):
        out = decode_banded(vae32.model, z, bands, split, order="band")
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert max_err(out, ref) <= FP32_TOL, (split, bands)


@pytest.mark.parametrize("split", SPLITS)
def test_band_order_equals_whole_bf16(vae16, split):
    z = latent().bfloat16()  # tolerance as in test_banded_equals_whole_bf16
    ref = whole(vae16.model, z)
    out = decode_banded(vae16.model, z, 3, split, order="band")
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert max_err(out, ref) <= 1 / 64


def test_band_order_default_split_single_frame_and_clamped_bands(vae32):
    z = latent(t=1, seed=2)  # one latent frame: only the first-chunk path
    ref = whole(vae32.model, z)
    out = decode_banded(vae32.model, z, 4, order="band")  # split None -> DEFAULT_BAND_SPLIT
    assert DEFAULT_BAND_SPLIT == 0 and out.shape == ref.shape == (1, 3, 1, 320, 8)
    assert max_err(out, ref) <= FP32_TOL
    assert torch.equal(out, decode_banded(vae32.model, z, 4, DEFAULT_BAND_SPLIT, order="band"))

    z = latent(t=2, h=6, seed=1)  # 6 rows at split 0: 50 bands -> 6 of one row each
    assert max_err(decode_banded(vae32.model, z, 50, split=0, order="band"), whole(vae32.model, z)) <= FP32_TOL


def test_band_order_more_frames_and_columns(vae32):
    z = latent(t=5, h=24, w=5, seed=4)  # 17 frames, 40 columns: steady-state caches, real 2-D convs
    ref = whole(vae32.model, z)
    assert torch.equal(decode_banded(vae32.model, z, 1, 0, order="band"), ref)  # one band: same shapes, bit for bit
    for split, bands in ((0, 4), (1, 7)):
        assert max_err(decode_banded(vae32.model, z, bands, split, order="band"), ref) <= FP32_TOL


def test_band_order_halo_matters(vae32, ref32):
    z, ref = ref32
    assert max_err(decode_banded(vae32.model, z, 2, 0, halo=0, order="band"), ref) > 1e-2  # no halo: a seam


def test_bad_order(vae32):
    with pytest.raises(ValueError, match="order"):
        decode_banded(vae32.model, latent(t=1), 2, order="rows")
