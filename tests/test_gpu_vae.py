"""GPU tier for the banded VAE decode: `python -m pytest -m gpu tests/test_gpu_vae.py` (skipped without CUDA).

The official-size Wan 2.1 VAE (base_dim 96) with realistic random weights, built on the GPU: whole-frame diffusers
decode against `decode_banded` (4 bands, default split), fp32 with TF32 off, recording error, peak memory and time.
"""
import time
from contextlib import contextmanager

import pytest
import torch

from wan.modules.vae import build_wan_vae
from wan.modules.vae_bands import DEFAULT_SPLIT, decode_banded, halo_rows
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
def test_banded_decode_official_size_fp32(gpu_record):
    model = randomize_weights_on_device_(build_wan_vae(96, device="cuda").eval(), seed=0).requires_grad_(False)
    z = torch.randn(1, 16, 3, 60, 104, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with tf32_off():
        warm = z[:, :, :2, :16, :16]  # CUDA/cuDNN start-up outside the timings
        model.decode(warm)
        decode_banded(model, warm, 4)
        whole, whole_peak, whole_s = measured(lambda: model.decode(z).sample)
        banded, banded_peak, banded_s = measured(lambda: decode_banded(model, z, 4))
    err = (banded - whole).abs().max().item()
    gib = 2 ** 30
    gpu_record(shape=list(whole.shape), split=DEFAULT_SPLIT, halo=halo_rows(model.decoder, DEFAULT_SPLIT),
               max_abs=err, bit_exact=torch.equal(banded, whole), whole_peak_gib=round(whole_peak / gib, 3),
               banded_peak_gib=round(banded_peak / gib, 3), whole_s=round(whole_s, 3), banded_s=round(banded_s, 3))
    assert whole.shape == banded.shape == (1, 3, 9, 480, 832)
    assert whole.std() > 0.05  # a real picture, not a constant
    assert err <= 1e-4
    assert banded_peak < whole_peak
