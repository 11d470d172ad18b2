"""GPU tier: building and loading full-width experts stay within the kept weights plus one fp32 tensor, so both
bf16 A14B experts build and load on an 80 GB H100 (issue: the benchmark's fp32 build ran out of memory there).
Measured with the CUDA allocator's peak on A14B-width models of a few blocks (the per-block arithmetic is the same
for 40 blocks)."""
import pytest
import torch

from wan.configs.model_config import A14B
from wan.modules.model import WanModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
LAYERS = 3


def _largest_fp32_tensor(model) -> int:
    return max(p.numel() for p in model.parameters()) * 4


def _model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_random_build_peak_is_the_bf16_model_plus_one_fp32_tensor(gpu_record):
    from wan.testing.random_init import materialize_random_

    cfg = A14B.__class__(**{**A14B.__dict__, "num_layers": LAYERS})
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.device("meta"):
        model = WanModel.from_config(cfg)
    model = materialize_random_(model, "cuda", torch.bfloat16, seed=0)
    torch.cuda.synchronize()
    kept, peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
    extra = peak - kept
    gpu_record(kept_gb=kept / 1e9, peak_gb=peak / 1e9, extra_mb=extra / 2**20,
               largest_fp32_mb=_largest_fp32_tensor(model) / 2**20)
    assert abs(kept - _model_bytes(model)) < 16 * 2**20  # the allocator's rounding (+6 MB on an H100)
    assert extra <= _largest_fp32_tensor(model) * 1.01


def test_loader_peak_is_the_kept_weights_plus_one_fp32_tensor(tmp_path, gpu_record):
    """An fp32 checkpoint in several shards (as the official 6-shard experts) loaded as bf16 onto the GPU."""
    from wan.modules.checkpoint import load_wan_model, save_wan_model
    from wan.testing.random_init import materialize_random_

    cfg = A14B.__class__(**{**A14B.__dict__, "num_layers": LAYERS})
    with torch.device("meta"):
        model = WanModel.from_config(cfg)
    save_wan_model(materialize_random_(model, "cpu", torch.float32, seed=0), tmp_path / "expert",
                   max_shard_bytes=2 * 2**30)
    largest = _largest_fp32_tensor(model)
    del model
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loaded = load_wan_model(WanModel, tmp_path, "expert", torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    kept, peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
    gpu_record(kept_gb=kept / 1e9, peak_gb=peak / 1e9, extra_mb=(peak - kept) / 2**20, largest_fp32_mb=largest / 2**20,
               shards=len(list((tmp_path / "expert").glob("*.safetensors"))))
    assert abs(kept - _model_bytes(loaded)) < 16 * 2**20 and next(loaded.parameters()).dtype == torch.bfloat16
    assert peak - kept <= largest * 1.01


def test_gguf_torch_ports_on_the_gpu_equal_the_cpu_ports(gpu_record):
    """The GGUF ports dequantize on the load device: on the GPU they give the CPU port's bits (which equal the gguf
    package's, tests/test_gguf_torch.py; the package is not needed here). Random blocks; every fp16 field sits at an
    even byte offset, so clearing bit 6 of each odd byte makes every scale finite."""
    from wan.formats.quant import TORCH_PORTS

    g = torch.Generator().manual_seed(0)
    for name, (size, port) in TORCH_PORTS.items():
        raw = torch.randint(0, 256, (4099, size), generator=g, dtype=torch.uint8)
        raw[:, 1::2] &= 0xBF
        cpu, gpu = port(raw), port(raw.cuda()).cpu()
        assert torch.equal(cpu.view(torch.int32), gpu.view(torch.int32)), name
    gpu_record(types=sorted(TORCH_PORTS))
