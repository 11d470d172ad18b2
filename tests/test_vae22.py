"""The Wan 2.2 VAE (TI2V-5B) on a tiny random checkpoint in the original key layout, CPU only: the key map, encode and
decode against diffusers' AutoencoderKLWan at 1, 5 and 9 frames with the reference's normalisation, the encode
against the independent re-computation from the original keys (tests/ti2v_reference.py), the banded decode, bf16,
and bad checkpoints. (Against the reference's own vae2_2.py: bit for bit at 1, 5 and 9 frames, run once on CPU; see
the notes of issue 21.)"""
import pytest
import torch

from ti2v_reference import RefEncoder22
from wan.modules.vae import Wan2_1_VAE
from wan.modules.vae2_2 import WAN22_VAE_MEAN, WAN22_VAE_STD, Wan2_2_VAE
from wan.modules.vae_bands import decode_banded, halo_rows
from wan.testing.tiny_vae import write_tiny_vae_checkpoint
from wan.testing.tiny_vae22 import make_tiny_vae22, original_vae22_keys, write_tiny_vae22_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae22") / "Wan2.2_VAE.pth"
    model = write_tiny_vae22_checkpoint(path, seed=3)
    return path, model, Wan2_2_VAE(vae_pth=str(path), device="cpu")


def _norm():
    return torch.tensor(WAN22_VAE_MEAN).view(-1, 1, 1, 1), torch.tensor(WAN22_VAE_STD).view(-1, 1, 1, 1)


def test_checkpoint_layout_and_constants(tiny):
    path, model, vae = tiny
    raw = torch.load(path, weights_only=True)
    assert sorted(raw) == sorted(original_vae22_keys()) and len(raw) == 196  # the reference's 196 keys (facts §3)
    assert raw["encoder.conv1.weight"].shape == (8, 12, 3, 3, 3) and raw["decoder.head.2.weight"].shape[0] == 12
    assert "decoder.upsamples.0.upsamples.3.time_conv.weight" in raw  # Up_ResidualBlock: 3 resnets, then Resample
    assert all(v.dtype == torch.float32 and v.abs().max() > 0 for v in raw.values())
    a, b = model.state_dict(), vae.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = vae.model.config
    assert (c.is_residual, c.patch_size, c.z_dim, c.base_dim, c.decoder_base_dim) == (True, 2, 48, 8, 16)
    assert len(WAN22_VAE_MEAN) == len(WAN22_VAE_STD) == 48
    assert (WAN22_VAE_MEAN[0], WAN22_VAE_MEAN[19], WAN22_VAE_STD[39], WAN22_VAE_STD[47]) == (-0.2289, 0.5109, 1.6887,
                                                                                          0.7744)
    assert vae.scale[0].dtype == torch.float32 and torch.equal(vae.scale[1], 1.0 / torch.tensor(WAN22_VAE_STD))


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_and_decode_are_diffusers_with_the_reference_normalisation(tiny, frames):
    _, model, vae = tiny
    mean, std = _norm()
    g = torch.Generator().manual_seed(frames)
    video = torch.rand(3, frames, 64, 96, generator=g) * 2 - 1
    (z,) = vae.encode([video])
    with torch.no_grad():
        mu = model.encode(video[None]).latent_dist.mode()[0]
    assert z.shape == (48, 1 + (frames - 1) // 4, 4, 6) and torch.equal(z, (mu - mean) * (1.0 / std))
    assert z.std() > 0.1
    (x,) = vae.decode([z])
    with torch.no_grad():
        want = model.decode((z / (1.0 / std) + mean)[None]).sample[0].clamp(-1, 1)
    assert x.shape == (3, frames, 64, 96) and torch.equal(x, want)
    assert x.std() > 0.1 and (x.abs() < 1).float().mean() > 0.5


@pytest.mark.parametrize("frames", [1, 5])
def test_encode_matches_the_independent_recomputation_from_original_keys(tiny, frames):
    """The key map seen from the original names: a functional encoder that reads Wan2.2_VAE.pth directly."""
    path, _, vae = tiny
    g = torch.Generator().manual_seed(10 + frames)
    video = torch.rand(3, frames, 64, 64, generator=g) * 2 - 1
    ref = RefEncoder22(torch.load(path, weights_only=True)).encode(video)
    assert torch.equal(vae.encode([video])[0], ref) and ref.std() > 0.1


def test_banded_decode_generalises_to_the_wan22_decoder(tmp_path):
    """DupUp3D shortcuts and the 2x2 unpatchify are row-local: the halo rule holds, the same video within rounding
    (the interior of every band is computed with the whole-frame rows), bit for bit with one band."""
    model = make_tiny_vae22(seed=1, base_dim=8, decoder_base_dim=8)
    assert [halo_rows(model.decoder, k) for k in range(4)] == [13, 12, 10, 7]
    z = torch.randn(1, 48, 2, 30, 2, generator=torch.Generator().manual_seed(2))  # 30 latent rows > 2 x halo
    with torch.no_grad():
        whole = model.decode(z).sample
        for order, split, bands in (("frame", 2, 1), ("band", 0, 2), ("frame", 2, 2)):
            out = decode_banded(model, z, bands, split=split, order=order)
            assert out.shape == whole.shape == (1, 3, 5, 480, 32)
            if bands == 1:
                assert torch.equal(out, whole)
            else:
                assert (out - whole).abs().max() < 1e-5, (order, split, bands)


def test_wrapper_bands_and_bf16(tiny):
    """decode_bands through the wrapper; --vae_dtype bf16 is an approximation of the fp32 decode (tiny weights: the
    measured error at 720p is the backlog row ti2v_vae_720p's)."""
    path, _, vae = tiny
    z = torch.randn(48, 2, 2, 4, generator=torch.Generator().manual_seed(4))
    (whole,) = vae.decode([z])
    banded = Wan2_2_VAE(vae_pth=str(path), device="cpu", decode_bands=2).decode([z])[0]
    assert (banded - whole).abs().max() < 1e-5
    bf16 = Wan2_2_VAE(vae_pth=str(path), device="cpu", dtype=torch.bfloat16).decode([z])[0]
    err = (bf16 - whole).abs()
    assert bf16.dtype == torch.float32 and 0 < err.max() < 0.2 and err.mean() < 0.02


def test_bad_checkpoints_one_line(tiny, tmp_path):
    path, _, _ = tiny
    v21 = tmp_path / "Wan2.1_VAE.pth"
    write_tiny_vae_checkpoint(v21, seed=0, base_dim=8)
    with pytest.raises(ValueError) as err:  # a Wan 2.1 file where Wan2.2_VAE.pth belongs
        Wan2_2_VAE(vae_pth=str(v21), device="cpu")
    assert "\n" not in str(err.value) and "z_dim 16, expected z_dim=48" in str(err.value)
    with pytest.raises(ValueError) as err:  # and the other way round
        Wan2_1_VAE(vae_pth=str(path), device="cpu")
    assert "z_dim 48, expected z_dim=16" in str(err.value)
    sd = torch.load(path, weights_only=True)
    del sd["decoder.upsamples.1.upsamples.2.residual.2.weight"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "damaged.pth")
    with pytest.raises(ValueError) as err:
        Wan2_2_VAE(vae_pth=str(tmp_path / "damaged.pth"), device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "Wan 2.2" in msg and "missing decoder.up_blocks.1.resnets.2.conv1.weight" in msg
    assert "unexpected encoder.extra.weight" in msg
    with pytest.raises(FileNotFoundError, match="Wan2.2-TI2V-5B"):
        Wan2_2_VAE(vae_pth=str(tmp_path / "absent.pth"), device="cpu")
