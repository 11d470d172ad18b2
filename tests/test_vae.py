"""Wan 2.1 VAE wrapper on a tiny random checkpoint (original key layout), CPU only."""
import pytest
import torch

from wan.modules.vae import WAN21_VAE_MEAN, WAN21_VAE_STD, Wan2_1_VAE
from wan.testing.tiny_vae import original_vae_keys, write_tiny_vae_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "tiny_vae.pth"
    ref_model = write_tiny_vae_checkpoint(path, seed=0, base_dim=8)
    return path, ref_model, Wan2_1_VAE(vae_pth=str(path), device="cpu")


def test_tiny_checkpoint_round_trip(tiny, tmp_path):
    path, ref_model, vae = tiny
    raw = torch.load(path, weights_only=True)
    keys = original_vae_keys()
    assert set(raw) == set(keys) and len(raw) == len(keys) == 194  # original layout, nothing extra
    assert raw["encoder.conv1.weight"].shape == (8, 3, 3, 3, 3) and raw["conv2.weight"].shape == (16, 16, 1, 1, 1)
    a, b = ref_model.state_dict(), vae.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert vae.model.config.base_dim == 8 and vae.dtype == torch.float32
    # deterministic writer; different seed -> different weights; no zero-init leftovers
    write_tiny_vae_checkpoint(tmp_path / "again.pth", seed=0)
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert all(torch.equal(raw[k], again[k]) for k in raw)
    other = write_tiny_vae_checkpoint(tmp_path / "other.pth", seed=1).state_dict()
    assert not torch.equal(other["decoder.conv_out.weight"], a["decoder.conv_out.weight"])
    assert all(v.abs().max() > 0 for v in raw.values())
    gam = raw["decoder.head.0.gamma"]
    assert 0.5 < gam.min() and gam.max() < 1.5 and gam.std() > 0.01


@pytest.mark.parametrize("n", [1, 2, 3])
def test_decode_frame_counts(tiny, n):
    vae = tiny[2]
    z = torch.randn(16, n, 4, 4, generator=torch.Generator().manual_seed(n))
    (x,) = vae.decode([z])
    assert x.shape == (3, 1 + 4 * (n - 1), 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x.std() > 0.05 and (x.abs() < 1).float().mean() > 0.5  # not constant, not all clamped


def test_decode_is_causal_per_latent_frame(tiny):
    # One latent frame at a time with a causal cache: a latent prefix decodes to the same frame prefix.
    vae = tiny[2]
    z = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    full, pre = vae.decode([z, z[:, :2]])
    assert full.shape[1] == 9 and pre.shape[1] == 5
    torch.testing.assert_close(full[:, :5], pre, atol=1e-6, rtol=0)
    assert (full[:, 5:] - pre[:, -1:]).abs().max() > 1e-3  # later frames do change


def test_encode_shape(tiny):
    vae = tiny[2]
    v = torch.rand(3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    (z,) = vae.encode([v])
    assert z.shape == (16, 3, 4, 4) and z.dtype == torch.float32 and z.std() > 1e-3


def test_normalisation(tiny):
    vae = tiny[2]
    mean, std = torch.tensor(WAN21_VAE_MEAN), torch.tensor(WAN21_VAE_STD)
    assert WAN21_VAE_MEAN[0] == -0.7571 and WAN21_VAE_STD[15] == 1.9160 and WAN21_VAE_MEAN[7] == 1.5508
    assert vae.scale[0].dtype == torch.float32 and vae.scale[0][0] == torch.tensor(-0.7571)
    assert vae.scale[0][15] == torch.tensor(-0.2921) and vae.scale[1][0] == 1.0 / torch.tensor(2.8184)
    torch.testing.assert_close(vae.scale[1], 1.0 / torch.tensor(WAN21_VAE_STD), rtol=0, atol=0)
    assert len(vae.scale[0]) == 16 and vae.scale[0].device.type == "cpu"

    g = torch.Generator().manual_seed(3)
    z = torch.randn(16, 2, 4, 4, generator=g)
    (x,) = vae.decode([z])
    v = (z * std.view(-1, 1, 1, 1) + mean.view(-1, 1, 1, 1))[None]
    with torch.no_grad():
        ref = vae.model.decode(v).sample[0]
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
    # the wrapper really un-normalises: decoding z directly differs
    with torch.no_grad():
        assert (vae.model.decode(z[None]).sample[0] - x).abs().max() > 1e-2

    video = torch.rand(3, 5, 32, 32, generator=g) * 2 - 1
    (lat,) = vae.encode([video])
    with torch.no_grad():
        mu = vae.model.encode(video[None]).latent_dist.mode()[0]
    torch.testing.assert_close(lat, (mu - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1), atol=1e-5, rtol=1e-5)


def test_outer_bf16_autocast_is_ignored(tiny):
    vae = tiny[2]
    z = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (x_ac,) = vae.decode([z])
    (x,) = vae.decode([z])
    assert torch.equal(x_ac, x)


def test_missing_file(tmp_path):
    missing = tmp_path / "Wan2.1_VAE.pth"
    with pytest.raises(FileNotFoundError) as e:
        Wan2_1_VAE(vae_pth=str(missing), device="cpu")
    assert str(missing) in str(e.value) and "Wan2.2-T2V-A14B" in str(e.value)


def test_bad_checkpoints_give_one_line_errors(tiny, tmp_path):
    sd = torch.load(tiny[0], weights_only=True)
    dropped = "decoder.upsamples.5.residual.2.weight"
    del sd[dropped]
    torch.save(sd, tmp_path / "trunc.pth")
    with pytest.raises(ValueError) as e:
        Wan2_1_VAE(vae_pth=str(tmp_path / "trunc.pth"), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "missing" in msg and "up_blocks.1.resnets.1.conv1.weight" in msg

    sd = torch.load(tiny[0], weights_only=True)
    sd["decoder.head.2.weight"] = sd["decoder.head.2.weight"][:, :4]  # shape mismatch
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError) as e:
        Wan2_1_VAE(vae_pth=str(tmp_path / "shape.pth"), device="cpu")
    assert "\n" not in str(e.value) and "decoder.conv_out.weight" in str(e.value) and len(str(e.value)) < 400

    with pytest.raises(ValueError) as e:  # z_dim checked against the checkpoint
        Wan2_1_VAE(z_dim=8, vae_pth=str(tiny[0]), device="cpu")
    assert "z_dim 16" in str(e.value)

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as e:
        Wan2_1_VAE(vae_pth=str(tmp_path / "junk.pth"), device="cpu")
    assert "\n" not in str(e.value)
