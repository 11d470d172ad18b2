"""GPU tier for the banded VAE decode: `python -m pytest -m gpu tests/test_gpu_vae.py` (skipped without CUDA).

The official-size Wan 2.1 VAE (base_dim 96) with realistic random weights, built on the GPU: whole-frame diffusers
decode against `decode_banded` (4 bands, frame and band order), fp32 with TF32 off, recording error, peak memory and
time; and the 720p x 81 bf16 decode in band order against whole frames (issue #11's 6 GB decode target).
"""
import time
from contextlib import contextmanager

import pytest
import torch

from wan.modules.vae import build_wan_vae
from wan.modules.vae_bands import DEFAULT_BAND_SPLIT, DEFAULT_SPLIT, decode_banded, halo_rows
from wan.testing.random_init import randomize_weights_on_device_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@contextmanager
def tf32_off():
    """Plain fp32 convs and matmuls: TF32 would round differently on the two paths' shapes."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def measured(fn):
    """(result moved to the host, peak bytes allocated above the starting point, seconds)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base
    return out.cpu(), peak, seconds


@torch.no_grad()
@pytest.mark.parametrize("order", ["frame", "band"])
def test_banded_decode_official_size_fp32(order, gpu_record):
    model = randomize_weights_on_device_(build_wan_vae(96, device="cuda").eval(), seed=0).requires_grad_(False)
    z = torch.randn(1, 16, 3, 60, 104, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    split = DEFAULT_SPLIT if order == "frame" else DEFAULT_BAND_SPLIT
    with tf32_off():
        warm = z[:, :, :2, :16, :16]  # CUDA/cuDNN start-up outside the timings
        model.decode(warm)
        decode_banded(model, warm, 4, order=order)
        whole, whole_peak, whole_s = measured(lambda: model.decode(z).sample)
        banded, banded_peak, banded_s = measured(lambda: decode_banded(model, z, 4, order=order))
    err = (banded - whole).abs().max().item()
    gib = 2 ** 30
    gpu_record(order=order, shape=list(whole.shape), split=split, halo=halo_rows(model.decoder, split),
               max_abs=err, bit_exact=torch.equal(banded, whole), whole_peak_gib=round(whole_peak / gib, 3),
               banded_peak_gib=round(banded_peak / gib, 3), whole_s=round(whole_s, 3), banded_s=round(banded_s, 3))
    assert whole.shape == banded.shape == (1, 3, 9, 480, 832)
    assert whole.std() > 0.05  # a real picture, not a constant
    assert err <= 1e-4
    assert banded_peak < whole_peak


@torch.no_grad()
def test_band_order_decode_720p_bf16(gpu_record):
    """The product's --vae_bands 4 at 1280x720x81 in bf16 (--vae_dtype bf16): peak at most 6 GB above the weights
    (issue #11; a live-tensor count says 2.8 GiB), the whole-frame video within bf16 rounding, both timed."""
    model = build_wan_vae(96, device="cuda").eval()
    model = randomize_weights_on_device_(model, seed=0).to(torch.bfloat16).requires_grad_(False)
    z = torch.randn(1, 16, 21, 90, 160, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    z = z.to(torch.bfloat16)
    warm = z[:, :, :2, :16, :16]
    model.decode(warm)
    decode_banded(model, warm, 4, order="band")
    banded, banded_peak, banded_s = measured(lambda: decode_banded(model, z, 4, order="band"))
    whole, whole_peak, whole_s = measured(lambda: model.decode(z).sample.clamp_(-1, 1))
    d = (banded.float() - whole.float()).abs()
    psnr = (10 * torch.log10(4 / d.pow(2).mean())).item()  # range [-1, 1]
    gpu_record(whole_peak_gb=whole_peak / 1e9, banded_peak_gb=banded_peak / 1e9, whole_s=whole_s, banded_s=banded_s,
               max_abs=d.max().item(), psnr_db=psnr)
    assert banded.shape == whole.shape == (1, 3, 81, 720, 1280)
    assert banded_peak <= 6e9 and banded_peak < whole_peak, (banded_peak, whole_peak)
    assert psnr > 40, psnr


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_i2v_condition_encode_reusing_repeats_is_bit_for_bit_at_720p(dtype, gpu_record):
    """The I2V condition (a 720p image, then 80 black frames) through the official-size VAE: encode_mean (reuses the
    layers whose inputs repeat) against diffusers' plain encode, torch.equal, with the default TF32 convs (as a run
    has them), recording both times and peaks (the reference's encode is the fp32 one)."""
    from wan.modules.vae_encode import encode_mean

    model = randomize_weights_on_device_(build_wan_vae(96, device="cuda").eval(), seed=0).requires_grad_(False)
    model = model.to(dtype)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.zeros(1, 3, 81, 720, 1280, device="cuda", dtype=dtype)
    x[:, :, 0] = torch.rand(3, 720, 1280, device="cuda", generator=g).to(dtype) * 2 - 1
    model.encode(x[:, :, :5])  # warm: cuDNN plans for both chunk shapes
    stats = {}
    plain, plain_peak, plain_s = measured(lambda: model.encode(x).latent_dist.mode())
    fast, fast_peak, fast_s = measured(lambda: encode_mean(model, x, stats))
    gpu_record(dtype=str(dtype), plain_s=plain_s, reuse_s=fast_s, speedup=plain_s / fast_s,
               plain_peak_gb=plain_peak / 1e9, reuse_peak_gb=fast_peak / 1e9, layers_computed=stats["computed"])
    assert torch.equal(fast, plain)
    assert fast_s < plain_s and sum(stats["computed"]) < 0.6 * stats["chunks"] * stats["layers"]


@torch.no_grad()
def test_wan22_banded_decode_official_size_fp32(gpu_record):
    """The official-size Wan 2.2 VAE (TI2V-5B: dims 160 / 256, z 48) on the GPU: the band-order decode (4 bands)
    against the whole-frame one in fp32 with TF32 off, its error, peaks and times; and the bf16 whole-frame decode's
    error against fp32 (--vae_dtype bf16)."""
    from wan.modules.vae2_2 import build_wan22_vae

    model = randomize_weights_on_device_(build_wan22_vae(device="cuda").eval(), seed=0).requires_grad_(False)
    z = torch.randn(1, 48, 3, 30, 40, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with tf32_off():
        warm = z[:, :, :2, :8, :8]
        model.decode(warm)
        decode_banded(model, warm, 4, order="band")
        whole, whole_peak, whole_s = measured(lambda: model.decode(z).sample)
        banded, banded_peak, banded_s = measured(lambda: decode_banded(model, z, 4, order="band"))
    bf16 = model._apply(lambda t: t.to(torch.bfloat16))
    half, half_peak, half_s = measured(lambda: bf16.decode(z.bfloat16()).sample.float())
    gib = 2 ** 30
    err, err16 = (banded - whole).abs().max().item(), (half - whole).abs()
    gpu_record(shape=list(whole.shape), max_abs=err, whole_peak_gib=round(whole_peak / gib, 3),
               banded_peak_gib=round(banded_peak / gib, 3), whole_s=round(whole_s, 3), banded_s=round(banded_s, 3),
               bf16_max_abs=err16.max().item(), bf16_mean_abs=err16.mean().item(),
               bf16_peak_gib=round(half_peak / gib, 3), bf16_s=round(half_s, 3))
    assert whole.shape == (1, 3, 9, 480, 640) and whole.std() > 0.05
    assert err < 1e-4 and banded_peak < whole_peak
