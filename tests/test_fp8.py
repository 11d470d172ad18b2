"""The fp8 tier on the CPU: e4m3 quantisation bounds, Fp8Linear through its emulated kernel (what the GPU kernel
computes, up to fp32 summation order), which linears each --fp8_linear choice converts, LoRA merged before
quantising, the refusals where fp8 cannot run, the options and CLI, flash3_fp8's math, and the benchmark's smoke run.
GPU numbers: tests/test_gpu_fp8.py and benchmarks/fp8.py."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from wan.configs import WAN_CONFIGS
from wan.configs.model_config import TINY
from wan.errors import LoadTimeOptionError
from wan.modules.attention import (FP8_MIN_KEYS, BackendUnavailableError, emulated_fp8_attention,
                                   fp8_attention_reference, quantize_per_head, resolve_attention, smooth_keys)
from wan.modules.fp8 import (E4M3_MAX, FP8_LINEAR, TARGETS, Fp8Linear, Fp8UnavailableError,
                             convert_linears_to_fp8_, dequantize, quantize, quantize_weight)
from wan.options import FAST_PRESET, LOAD_FIELDS, RuntimeOptions, fast_options
from wan.testing.tiny import build_tiny_dit

EXPECTED = {  # --fp8_linear choice -> the block linears it converts (and nothing else)
    "none": set(),
    "ffn": {"ffn.0", "ffn.2"},
    "attn_proj": {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o"},
}
EXPECTED["all"] = EXPECTED["ffn"] | EXPECTED["attn_proj"]
FP8_LINEAR_REL_ERR = 0.06  # measured 3.7e-2 on fan-in-scaled weights and N(0, 1) tokens (bf16: 2.9e-3)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def realistic_linear(k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * k ** -0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.02)
    return lin


# ---- e4m3 quantisation ---------------------------------------------------------------------------------------------
def test_round_trip_within_e4m3_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g) * torch.logspace(-4, 4, 64).unsqueeze(1)  # rows over 8 decades
    x8, scale = quantize(x, dim=1)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (64, 1) and scale.dtype == torch.float32
    back = dequantize(x8, scale)
    normal = x.abs() >= scale * 2.0 ** -6  # e4m3's normal range, in units of the row's scale
    rel_err = ((back - x).abs() / x.abs())[normal]
    assert normal.float().mean() > 0.95 and rel_err.max() <= 2.0 ** -4 * (1 + 1e-6), rel_err.max()
    # below the normal range: subnormal steps of 2^-9 scale, so half a step at most
    assert ((back - x).abs()[~normal] <= scale.expand_as(x)[~normal] * 2.0 ** -10 * (1 + 1e-6)).all()
    amax = x.abs().amax(dim=1, keepdim=True)
    assert ((back.abs().amax(dim=1, keepdim=True) - amax).abs() <= 1e-6 * amax).all()  # the row's amax is exact


def test_scales_never_zero_or_inf():
    w = torch.randn(6, 64) * 0.02
    w[1] = 0.0  # an all-zero row
    w[2, 5] = 1e4  # a huge outlier
    w[3] *= 1e-30  # tiny values
    w[4] *= 1e30  # huge values
    w8, s = quantize_weight(w)
    assert s.shape == (6,) and torch.isfinite(s).all() and (s > 0).all()
    back = dequantize(w8, s.unsqueeze(1))
    assert torch.isfinite(back).all() and (back[1] == 0).all()
    assert abs(back[2, 5].item() - 1e4) <= 1e4 * 2.0 ** -4  # the outlier survives; its row's small values may not
    for row in (0, 3, 4):
        assert rel(back[row], w[row]) < 0.05
    bad = w.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(bad)
    x8, sx = quantize(torch.zeros(3, 32), dim=1)  # all-zero tokens: zeros out, finite scales
    assert (x8.float() == 0).all() and (sx > 0).all() and torch.isfinite(sx).all()


# ---- Fp8Linear (emulated kernel) ------------------------------------------------------------------------------------
def test_fp8_linear_emulated_against_the_linear_it_replaces():
    lin = realistic_linear(512, 1024)
    fp8 = Fp8Linear.from_linear(lin, kernel="emulated")
    x = torch.randn(2, 37, 512, generator=torch.Generator().manual_seed(1))  # 74 tokens: not a multiple of 16
    exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    y = fp8(x)
    assert y.shape == (2, 37, 1024)
    err = rel(y, exact)
    bf16 = rel(torch.nn.functional.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()), exact)
    assert 5 * bf16 < err < FP8_LINEAR_REL_ERR, (err, bf16)  # really quantised, and within the stated bound
    # the emulated kernel is the dequantised product, scales and bias in fp32, one rounding to bf16
    x8, sx = quantize(x.reshape(-1, 512), dim=1)
    ref = dequantize(x8, sx) @ dequantize(fp8.weight, fp8.weight_scale.unsqueeze(1)).t() + fp8.bias.float()
    torch.testing.assert_close(y.reshape(-1, 1024), ref.to(torch.bfloat16).float(), rtol=2.0 ** -7, atol=1e-5)


def test_fp8_linear_parameters_stream_and_state_dict():
    fp8 = Fp8Linear.from_linear(realistic_linear(64, 128), kernel="emulated")
    params = dict(fp8.named_parameters())
    assert set(params) == {"weight", "weight_scale", "bias"}
    assert params["weight"].dtype == torch.float8_e4m3fn and params["weight"].shape == (128, 64)
    assert params["weight_scale"].dtype == torch.float32 and params["bias"].dtype == torch.bfloat16
    assert not any(p.requires_grad for p in params.values())
    assert set(fp8.state_dict()) == {"weight", "weight_scale", "bias"}
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Linear.from_linear(nn.Linear(24, 64))
    with pytest.raises(ValueError, match="kernel"):
        Fp8Linear(64, 64, kernel="triton")


@pytest.mark.parametrize("which", FP8_LINEAR)
def test_convert_converts_exactly_the_promised_linears(which):
    model = build_tiny_dit(1)
    before = {n: type(m) for n, m in model.named_modules()}
    summary = convert_linears_to_fp8_(model, which, kernel="emulated")
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    expected = {f"blocks.{i}.{t}" for i in range(len(model.blocks)) for t in EXPECTED[which]}
    assert fp8 == expected and set(TARGETS[which]) == EXPECTED[which]
    # everything else kept its type: the embeddings, time projection, head, cross-attention k / v
    assert all(type(m) is before[n] for n, m in model.named_modules() if n not in fp8)
    assert all(type(model.get_submodule(f"blocks.0.cross_attn.{p}")) is nn.Linear for p in "kv")
    assert summary.linears == len(expected)
    if which != "none":
        assert summary.bytes_after < 0.5 * summary.bytes_before and which in summary.describe()
        with pytest.raises(TypeError, match="converted twice"):
            convert_linears_to_fp8_(model, which, kernel="emulated")
    else:
        assert summary.describe() == "off"


def test_refused_on_the_cpu_without_the_emulated_kernel(tmp_path):
    from wan.text2video import WanT2V

    model = build_tiny_dit(1)
    with pytest.raises(Fp8UnavailableError) as exc:
        convert_linears_to_fp8_(model, "ffn")
    msg = str(exc.value)
    assert "\n" not in msg and "CPU" in msg and "--fp8_linear" in msg and "8.9" in msg
    with pytest.raises(Fp8UnavailableError, match="CUDA only"):
        Fp8Linear.from_linear(realistic_linear(64, 64))(torch.randn(3, 64))  # the GPU kernel on a CPU tensor
    # the pipeline refuses before loading anything: the checkpoint folder does not even exist
    with pytest.raises(Fp8UnavailableError, match="this run is on the CPU"):
        WanT2V(WAN_CONFIGS["t2v-tiny"], tmp_path / "missing", device="cpu", options=RuntimeOptions(fp8_linear="all"))
    with pytest.raises(BackendUnavailableError, match="flash3_fp8 needs a Hopper GPU") as exc:
        WanT2V(WAN_CONFIGS["t2v-tiny"], tmp_path / "missing", device="cpu",
               options=RuntimeOptions(attn_backend="flash3_fp8"))
    assert "\n" not in str(exc.value)


# ---- the pipeline: LoRA merged first, then quantised ----------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from wan.testing.random_lora import write_random_lora_dir

    return write_random_lora_dir(tmp_path_factory.mktemp("lora"), TINY, rank=4, seed=5)


def _fp8_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def test_lora_is_merged_before_quantisation_through_the_real_loader(tiny_ckpt, lora_dir):
    from wan.text2video import WanT2V

    cfg = WAN_CONFIGS["t2v-tiny"]
    merged = WanT2V(cfg, tiny_ckpt, device="cpu", lora_dir=str(lora_dir))  # fp32 weights with the LoRA merged
    plain = WanT2V(cfg, tiny_ckpt, device="cpu")
    pipe = WanT2V(cfg, tiny_ckpt, device="cpu", lora_dir=str(lora_dir), options=RuntimeOptions(fp8_linear="all"),
                  fp8_kernel="emulated")
    for expert in ("high", "low"):
        got = _fp8_linears(getattr(pipe, f"{expert}_noise_model"))
        ref = dict(getattr(merged, f"{expert}_noise_model").named_modules())
        unmerged = dict(getattr(plain, f"{expert}_noise_model").named_modules())
        assert len(got) == 2 * len(EXPECTED["all"])
        for name, m in got.items():
            w8, s = quantize_weight(ref[name].weight)
            assert torch.equal(m.weight.float(), w8.float()) and torch.equal(m.weight_scale, s), name
            assert torch.equal(m.bias, ref[name].bias.to(torch.bfloat16))
            assert not torch.equal(quantize_weight(unmerged[name].weight)[0].float(), w8.float())  # LoRA mattered
    rec = pipe.backends()
    assert rec["fp8_linear"]["high"].startswith("all (emulated): 16 linears") and set(rec["loras"]) == {"high", "low"}
    assert "fp8_convert" in pipe.load_timings and plain.backends()["fp8_linear"] == "off"
    # a per-call request cannot change a load-time choice
    with pytest.raises(LoadTimeOptionError, match="fp8_linear"):
        plain.generate("a cat", options=RuntimeOptions(fp8_linear="ffn"), size=(64, 64), frame_num=5,
                       sampling_steps=1)
    # and the emulated pipeline runs end to end, close to the fp32 original
    gen = dict(size=(64, 64), frame_num=5, sampling_steps=2, seed=3, shift=12.0, guide_scale=1.0)
    _, a = merged.generate("a cat", return_latents=True, **gen)
    _, b = pipe.generate("a cat", return_latents=True, **gen)
    assert 0 < rel(b, a) < 0.1


def test_components_path_merges_the_lora_before_quantisation(lora_dir):
    from wan.lora import merge_lora_
    from wan.text2video import WanT2V

    high, low = build_tiny_dit(1), build_tiny_dit(2)
    ref = copy.deepcopy(high)
    merge_lora_(ref, lora_dir / "high_noise_model.safetensors", 1.0)
    comps = dict(text_encoder=None, vae=None, high_noise_model=high, low_noise_model=low)
    WanT2V(WAN_CONFIGS["t2v-tiny"], None, device="cpu", components=comps, options=RuntimeOptions(fp8_linear="ffn"),
           lora_high=lora_dir / "high_noise_model.safetensors", fp8_kernel="emulated")
    for name, m in _fp8_linears(high).items():
        w8, s = quantize_weight(ref.get_submodule(name).weight)
        assert torch.equal(m.weight.float(), w8.float()) and torch.equal(m.weight_scale, s), name


# ---- options and CLI ------------------------------------------------------------------------------------------------
def test_options_and_cli():
    from wan.cli import build_parser, options_from_args

    assert "fp8_linear" in LOAD_FIELDS and RuntimeOptions().fp8_linear == "none"
    assert not any("fp8" in k for k in FAST_PRESET)
    fast = fast_options()
    assert fast.fp8_linear == "none" and fast.attn_backend != "flash3_fp8"
    with pytest.raises(ValueError, match="fp8_linear must be one of none, ffn, attn_proj, all"):
        RuntimeOptions(fp8_linear="int8")
    with pytest.raises(ValueError, match="dit_fsdp"):
        RuntimeOptions(fp8_linear="ffn", dit_fsdp=True)
    parser = build_parser()
    opts = options_from_args(parser.parse_args(["--fast", "--fp8_linear", "attn_proj", "--attn_backend",
                                                "flash3_fp8"]))
    assert opts.fp8_linear == "attn_proj" and opts.attn_backend == "flash3_fp8" and opts.compile
    assert options_from_args(parser.parse_args(["--fast"])).fp8_linear == "none"
    text = " ".join(parser.format_help().split())
    assert "approximation" in text and "never part of --fast" in text and "{none,ffn,attn_proj,all}" in text


# ---- flash3_fp8's math ---------------------------------------------------------------------------------------------
def exact_attention(q, k, v):
    """float64 softmax(q k^T / sqrt(D)) v on [B, L, H, D]."""
    q, k, v = (u.double().transpose(1, 2) for u in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / q.size(-1) ** 0.5, dim=-1)
    return (w @ v).transpose(1, 2)


def qkv(b=2, lq=96, lk=80, h=3, d=32, key_offset=0.0, value_offset=0.0, seed=0):
    """Random q, k, v [B, L, H, D]; the offsets are shared by every key (value) of a (head, channel), as the keys and
    values of a real block have (their mean over the tokens is 0.2 to 0.8 of their spread in random-weight blocks)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g) for n in (lq, lk, lk))
    k = k + key_offset * torch.randn(1, 1, h, d, generator=g)
    return q, k, v + value_offset * torch.randn(1, 1, h, d, generator=g)


def test_quantize_per_batch_and_head():
    q, _, _ = qkv()
    q = q * torch.tensor([1.0, 100.0, 0.01]).view(1, 1, 3, 1)  # heads of very different sizes
    q8, descale = quantize_per_head(q)
    assert q8.shape == q.shape and descale.shape == (2, 3) and descale.dtype == torch.float32
    assert torch.allclose(descale, q.abs().amax(dim=(1, 3)) / E4M3_MAX)
    back = q8.float() * descale[:, None, :, None]
    assert rel(back, q) < 0.05 and all(rel(back[:, :, i], q[:, :, i]) < 0.05 for i in range(3))


def test_key_smoothing_is_exact_under_softmax():
    q, k, v = qkv(key_offset=4.0)
    smooth = smooth_keys(k)  # fp32
    assert smooth.dtype == torch.float32 and smooth.mean(dim=1).abs().max() < 1e-5
    k64 = k.double()
    assert rel(exact_attention(q, k64 - k64.mean(dim=1, keepdim=True), v), exact_attention(q, k, v)) < 1e-12
    assert rel(exact_attention(q, smooth, v), exact_attention(q, k, v)) < 1e-6  # only fp32 rounding of the keys
    fp32 = [torch.nn.functional.scaled_dot_product_attention(*(u.transpose(1, 2) for u in (q, kk, v)))
            for kk in (k, smooth)]
    assert rel(fp32[1], fp32[0]) < 1e-5  # fp32: the same up to rounding


def test_value_smoothing_is_exact():
    q, k, v = qkv(value_offset=4.0)
    mean = v.double().mean(dim=1, keepdim=True)
    # softmax rows sum to 1: P (V - mean) + mean = P V
    assert rel(exact_attention(q, k, v.double() - mean) + mean, exact_attention(q, k, v)) < 1e-12


def test_emulated_fp8_attention_error_and_smoothing_benefit():
    q, k, v = qkv(key_offset=4.0, value_offset=4.0)
    exact = exact_attention(q, k, v)
    errs = {(sk, sv): rel(fp8_attention_reference(q, k, v, smooth_k=sk, smooth_v=sv), exact)
            for sk in (True, False) for sv in (True, False)}
    best = errs[True, True]  # the default
    assert best < 0.01 and all(best < e for key, e in errs.items() if key != (True, True)), errs
    backend = emulated_fp8_attention(min_keys=0)
    assert rel(backend(q, k, v), exact) == pytest.approx(best, rel=1e-6)
    plain = qkv()  # zero-mean keys and values: smoothing is a no-op up to rounding, the error is e4m3's
    assert rel(fp8_attention_reference(*plain), exact_attention(*plain)) < 0.05
    # fewer keys than min_keys (the cross-attention's 512 text rows): the exact kernel, untouched
    short = emulated_fp8_attention()
    assert k.size(1) < FP8_MIN_KEYS and rel(short(q, k, v), exact) < 1e-6
    with pytest.raises(BackendUnavailableError, match="Hopper"):
        resolve_attention("flash3_fp8", torch.device("cpu"))


# ---- the benchmark, as a smoke run on the CPU ---------------------------------------------------------------------
def test_benchmark_smoke_cpu(tmp_path, capsys):
    from benchmarks import fp8

    out = tmp_path / "fp8.json"
    assert fp8.main(["--res", "tiny", "--device", "cpu", "--frame_num", "5", "--steps", "1", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert [v["label"] for v in rec["variants"]] == [v[0] for v in fp8.VARIANTS]
    assert all("skipped" not in v for v in rec["variants"])
    assert rec["kernel"] == "emulated" and 0 < rec["variants"][2]["pred_rel_err"] < 0.1
    assert rec["variants"][3]["attention"].startswith("flash3_fp8 emulated") and "block_rel_err" in rec["variants"][4]
    assert "| fp8_linear all + flash3_fp8 |" in capsys.readouterr().out
    out = tmp_path / "drift.json"
    assert fp8.main(["--drift", "--res", "tiny", "--device", "cpu", "--frame_num", "5", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["mode"] == "drift" and 0 < rec["variants"][1]["latent_rel_err"] < 0.1
    assert rec["variants"][2]["backends"]["fp8_linear"]["high"].startswith("all (emulated)")
    skipped = fp8.main(["--res", "tiny", "--device", "cpu", "--frame_num", "5", "--deadline", "0", "--out",
                        str(tmp_path / "late.json")])
    late = json.loads((tmp_path / "late.json").read_text())
    assert skipped == 0 and all("out of time" in v["skipped"] for v in late["variants"])
