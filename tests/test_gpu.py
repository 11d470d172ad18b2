"""The GPU tier: `python -m pytest -m gpu tests/test_gpu.py` (skipped without CUDA). Set WAN_GPU_REPORT=path to
write every test's outcome and measured numbers to a JSON file (benchmarks/results/gpu_tier.json is committed).

- the A/B contract on the GPU with the tiny model (TF32, bf16 weights, placement, per-call options);
- every attention backend against an fp32 math reference, bf16 and fp16, several shapes and key lengths;
- one full-width A14B block with the --fast switches against the original path, both against fp32;
- zero recompiles at a real shape across blocks of both experts and across timesteps;
- block streaming: the block copies run inside the compute (profiled) and cost at most 10%.
"""
import time

import pytest
import torch

from wan.errors import LoadTimeOptionError
from wan.options import RuntimeOptions, fast_options

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GEN = dict(size=(64, 64), frame_num=5, shift=12.0, sample_solver="unipc", sampling_steps=4, guide_scale=(3.0, 4.0),
           seed=11)
PROMPT = "a cat boxing on a stage under bright light"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def exact_attention(q, k, v, k_lens=None):
    """float64 softmax(q k^T / sqrt(D)) v on [B, L, H, D], keys of sample i limited to k_lens[i]."""
    out = []
    for i in range(q.size(0)):
        n = k.size(1) if k_lens is None else k_lens[i]
        qi, ki, vi = (u[i].double().transpose(0, 1) for u in (q, k[:, :n], v[:, :n]))  # [H, L, D]
        w = torch.softmax(qi @ ki.transpose(1, 2) / q.size(-1) ** 0.5, dim=-1)
        out.append((w @ vi).transpose(0, 1))
    return torch.stack(out)


class Fp32Attention:
    """The reference math with no cast to half precision (the backends cast on CUDA, as the reference does)."""
    name = "float64 exact"

    def __call__(self, q, k, v, k_lens=None):
        return exact_attention(q, k, v, k_lens).to(q.dtype)


def pipe_for(tiny_ckpt, **options):
    from wan.configs import WAN_CONFIGS
    from wan.text2video import WanT2V

    return WanT2V(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, device="cuda", options=RuntimeOptions(**options))


def run(pipe, options=None, **kw):
    video, latent = pipe.generate(PROMPT, options=options, return_latents=True, **{**GEN, **kw})
    return video, latent


def test_fast_pipeline_stays_resident_and_records_what_ran(tiny_ckpt, gpu_record):
    pipe = pipe_for(tiny_ckpt, **fast_options(compile=False, vae_dtype="bf16").__dict__)
    run(pipe)  # a plain generate() after building with --fast
    assert pipe.options.offload_model is False and pipe.placement.name == "resident"
    assert all(p.is_cuda for m in (pipe.high_noise_model, pipe.low_noise_model) for p in m.parameters())
    assert pipe.options.convert_model_dtype and next(pipe.high_noise_model.parameters()).dtype == torch.bfloat16
    assert pipe.last_result.options.convert_model_dtype and pipe.vae.dtype == torch.bfloat16
    gpu_record(placement=pipe.placement.describe(), backends=pipe.last_result.backends)


def test_default_pipeline_offloads_and_refuses_a_contradicting_call(tiny_ckpt):
    pipe = pipe_for(tiny_ckpt)
    assert pipe.options.offload_model is True and pipe.placement.name.startswith("expert offload")
    with pytest.raises(LoadTimeOptionError, match="offload_model"):
        run(pipe, offload_model=False)  # was: experts on the CPU, inputs on the GPU (device mismatch)
    with pytest.raises(LoadTimeOptionError, match="convert_model_dtype"):
        run(pipe, RuntimeOptions(convert_model_dtype=True))  # was: recorded bf16 while the weights stayed fp32
    run(pipe)
    assert pipe.last_result.expert_trace.count("low") >= 1
    # after the run both experts are back in host memory, as the reference leaves them
    assert not any(p.is_cuda for m in (pipe.high_noise_model, pipe.low_noise_model) for p in m.parameters())


def test_offload_equals_resident_on_gpu(tiny_ckpt, gpu_record):
    a = run(pipe_for(tiny_ckpt, offload_model=True))
    b = run(pipe_for(tiny_ckpt, offload_model=False))
    gpu_record(max_abs_latent=(a[1] - b[1]).abs().max().item())
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_block_streamed_equals_resident_on_gpu(tiny_ckpt, gpu_record):
    """Pinned host blocks through 2 device slots on a side stream: the same bits as resident, compiled too."""
    a = run(pipe_for(tiny_ckpt, offload_model=False, convert_model_dtype=True, compile=True))
    p = pipe_for(tiny_ckpt, stream_blocks=2, convert_model_dtype=True, compile=True)
    b = run(p)
    blocks = p.high_noise_model.blocks
    gpu_record(copies=p.placement.streamer.copies, on_demand=p.placement.streamer.on_demand,
               max_abs_latent=(a[1] - b[1]).abs().max().item())
    assert all(t.is_pinned() for t in blocks[0].parameters()) and p.high_noise_model.head.head.weight.is_cuda
    t5 = p.text_encoder.model.encoder  # streamed by layers too: pinned blocks, the ring given back after encoding
    assert all(t.is_pinned() for t in t5.block[0].parameters()) and p.placement.t5_streamer.slots is None
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_resident_with_streamed_t5_equals_resident_on_gpu(tiny_ckpt, gpu_record):
    """--t5_stream (the plan's choice where T5's whole copy would be the peak): experts resident, T5's blocks pinned
    on the host and streamed through their ring; the same bits as the whole-copy encode."""
    a = run(pipe_for(tiny_ckpt, offload_model=False, convert_model_dtype=True))
    p = pipe_for(tiny_ckpt, offload_model=False, convert_model_dtype=True, t5_stream=True)
    b = run(p)
    t5 = p.text_encoder.model.encoder
    gpu_record(t5_copies=p.placement.t5_streamer.copies, max_abs_latent=(a[1] - b[1]).abs().max().item())
    assert p.high_noise_model.blocks[0].self_attn.q.weight.is_cuda
    assert all(t.is_pinned() for t in t5.block[0].parameters())
    assert p.placement.t5_streamer.slots is None and p.placement.t5_streamer.copies > 0
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_tf32_is_restored_and_ab_equals_fresh_pipelines(tiny_ckpt, gpu_record):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    pipe = pipe_for(tiny_ckpt, offload_model=False)
    first = run(pipe)
    fast_call = RuntimeOptions(offload_model=False, tf32=True, batched_cfg=True, fast_rope=True,
                               fast_time_embedding=True)
    middle = run(pipe, fast_call)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    last = run(pipe, RuntimeOptions(offload_model=False))
    fresh = run(pipe_for(tiny_ckpt, offload_model=False))
    fresh_fast = run(pipe_for(tiny_ckpt, **fast_call.__dict__))
    gpu_record(first_vs_fresh=(first[1] - fresh[1]).abs().max().item(),
               last_vs_fresh=(last[1] - fresh[1]).abs().max().item(),
               middle_vs_fresh_fast=(middle[1] - fresh_fast[1]).abs().max().item(),
               fast_vs_original_rel=rel(middle[1], first[1]))
    assert torch.equal(first[1], fresh[1]) and torch.equal(last[1], fresh[1])
    assert torch.equal(middle[1], fresh_fast[1])
    assert rel(middle[1], first[1]) < 1e-2  # TF32 and reordered fp32 math, not a different result


def test_readme_ab_example(tiny_ckpt, gpu_record):
    """README's Python A/B: build with fast_options(), then generate(options=pipe.options.with_reference_calls())
    runs the reference kernels on the same weights, exactly as a pipeline built with those options would."""
    pipe = pipe_for(tiny_ckpt, **fast_options().__dict__)
    fast = run(pipe)
    ref = run(pipe, pipe.options.with_reference_calls())
    assert pipe.last_result.backends["compile"] == "off" and not pipe.last_result.options.fast_rope
    fresh_ref = run(pipe_for(tiny_ckpt, **pipe.options.with_reference_calls().__dict__))
    gpu_record(ref_vs_fresh=(ref[1] - fresh_ref[1]).abs().max().item(), fast_vs_ref_rel=rel(fast[1], ref[1]))
    assert torch.equal(ref[1], fresh_ref[1]) and torch.equal(ref[0], fresh_ref[0])
    assert rel(fast[1], ref[1]) < 2e-2 and pipe.options.compile  # back to the built options afterwards


# ---- attention backends ------------------------------------------------------------------------------------------
def _backends():
    from wan.modules.attention import BackendUnavailableError, resolve_attention

    out = {}
    for name in ("flash3", "cudnn", "flash", "efficient", "sdpa", "math"):
        try:
            out[name] = resolve_attention(name, torch.device("cuda"))
        except BackendUnavailableError as exc:
            out[name] = exc
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1024, 8, 128, None), (2, 777, 4, 128, [777, 500]), (1, 4096, 40, 128, None),
                                   (2, 300, 2, 64, [300, 1])])
def test_attention_backends_against_math(dtype, shape, gpu_record):
    b, seq, heads, dim, k_lens = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, seq, heads, dim, device="cuda", generator=g).to(dtype) for _ in range(3))
    backends = _backends()
    ref = exact_attention(q, k, v, k_lens)
    base_err = rel(backends["math"](q, k, v, k_lens=k_lens).float(), ref)
    errs = {}
    for name, be in backends.items():
        if isinstance(be, Exception):
            errs[name] = f"unavailable: {str(be)[:80]}"
            continue
        try:
            out = be(q, k, v, k_lens=k_lens)
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot take this dtype is reported, not hidden
            errs[name] = f"error: {str(exc).splitlines()[0][:80]}"
            continue
        assert out.dtype == dtype and out.shape == q.shape
        errs[name] = rel(out.float(), ref)
        assert errs[name] <= 2 * base_err + 1e-3, (name, errs[name], base_err)
    gpu_record(dtype=str(dtype), shape=list(shape[:4]), k_lens=k_lens, math_same_dtype_err=base_err, errors=errs)
    assert any(isinstance(e, float) for n, e in errs.items() if n != "math")


# ---- one full-width block: --fast switches against the original path -----------------------------------------------
def _block_inputs(model, frames=2, h=30, w=52, batch=1):
    g = torch.Generator(device="cuda").manual_seed(3)
    x = [torch.randn(16, frames, 2 * h, 2 * w, device="cuda", generator=g) for _ in range(batch)]
    ctx = [torch.randn(n, 4096, device="cuda", generator=g) for n in (40, 126)[:batch]]
    return x, ctx, frames * h * w


def test_full_width_blocks_fast_vs_original(gpu_record):
    """Two A14B-width blocks (dim 5120, 40 heads, ffn 13824): eager reference-form bf16 forward vs the compiled
    --fast forms, both measured against an fp32 forward with fp32 weights; fast may not be worse than 2x."""
    from wan.configs.model_config import A14B
    from wan.modules.attention import resolve_attention
    from wan.modules.model import WanModel
    from wan.testing.random_init import randomize_weights_on_device_
    from wan.utils.compile import compile_blocks

    cfg = A14B.__class__(**{**A14B.__dict__, "num_layers": 2})
    with torch.device("meta"):
        model = WanModel.from_config(cfg)
    model = randomize_weights_on_device_(model.to_empty(device="cuda"), seed=0).eval().requires_grad_(False)
    x, ctx, seq = _block_inputs(model)
    t = torch.tensor([937], device="cuda")
    with torch.no_grad():
        ref = model.configure(Fp32Attention())(x, t, ctx, seq)[0]  # fp32 weights, exact attention, no autocast
        model.to(torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            orig = model.configure(resolve_attention("cudnn", torch.device("cuda")))(x, t, ctx, seq)[0]
            model.configure(resolve_attention("auto", torch.device("cuda")), fast_rope=True, fast_time_embedding=True)
            compile_blocks(model)
            fast = model(x, t, ctx, seq)[0]
    e_orig, e_fast = rel(orig, ref), rel(fast, ref)
    gpu_record(err_original_vs_fp32=e_orig, err_fast_vs_fp32=e_fast, fast_vs_original=rel(fast, orig),
               attention=model.attention.name)
    assert e_fast <= 2 * e_orig + 1e-4, (e_fast, e_orig)


def test_no_recompiles_at_a_real_shape(gpu_record):
    """480p tokens (32,760), batch 2 (batched CFG), blocks of two different experts, two timesteps: one graph."""
    from torch._dynamo.utils import counters

    from wan.configs.model_config import A14B
    from wan.modules.attention import resolve_attention
    from wan.modules.model import WanModel
    from wan.testing.random_init import randomize_weights_on_device_
    from wan.utils.compile import compile_blocks

    cfg = A14B.__class__(**{**A14B.__dict__, "num_layers": 1})
    experts = []
    for seed in (0, 1):
        with torch.device("meta"):
            m = WanModel.from_config(cfg)
        m = randomize_weights_on_device_(m.to_empty(device="cuda").to(torch.bfloat16), seed).eval()
        m.requires_grad_(False).configure(resolve_attention("auto", torch.device("cuda")), fast_rope=True,
                                          fast_time_embedding=True)
        compile_blocks(m)
        experts.append(m)
    g = torch.Generator(device="cuda").manual_seed(0)
    lat = torch.randn(16, 21, 60, 104, device="cuda", generator=g)
    ctx = [torch.randn(n, 4096, device="cuda", generator=g).to(torch.bfloat16) for n in (40, 126)]
    counters.clear()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        experts[0]([lat, lat], torch.tensor([999, 999], device="cuda"), ctx, 32760)
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for m, t in ((experts[0], 972), (experts[1], 865), (experts[1], 235)):
                m([lat, lat], torch.tensor([t, t], device="cuda"), ctx, 32760)
    gpu_record(unique_graphs=graphs, after=counters["stats"]["unique_graphs"])
    assert counters["stats"]["unique_graphs"] == graphs


# ---- block streaming: the copies hide behind compute ----------------------------------------------------------------
def test_block_streaming_copies_overlap_compute(gpu_record):
    """Six A14B-width blocks streamed through 2 slots at 480p tokens (32,760; ~65 ms of compute per block against
    ~13 ms per 0.7 GB copy): in a profiled steady forward, the host-to-device copies of the blocks run while the
    compute stream's kernels run (>= 80% of copy time covered), and the streamed forward takes at most 1.1x the
    resident one. (At 9,360 tokens, 12.4 ms of compute per block, the copies cannot hide: 70% covered, 1.24x.)"""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.overlap import copy_overlap
    from wan.block_stream import BlockStreamer
    from wan.configs.model_config import A14B
    from wan.modules.attention import resolve_attention
    from wan.modules.model import WanModel
    from wan.testing.random_init import randomize_weights_on_device_
    from wan.utils.compile import compile_blocks

    cfg = A14B.__class__(**{**A14B.__dict__, "num_layers": 6})
    with torch.device("meta"):
        model = WanModel.from_config(cfg)
    model = randomize_weights_on_device_(model.to_empty(device="cuda").to(torch.bfloat16), 0).eval()
    model.requires_grad_(False).configure(resolve_attention("auto", torch.device("cuda")), fast_rope=True,
                                          fast_time_embedding=True)
    compile_blocks(model)
    x, ctx, seq = _block_inputs(model, frames=21, h=30, w=52)  # 480p: 32,760 tokens
    ctx = [c.to(torch.bfloat16) for c in ctx]
    t = torch.tensor([937], device="cuda")

    def forward_s(n=3):
        times = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x, t, ctx[:1], seq)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, t, ctx[:1], seq)  # compile
        resident_s = forward_s()
        streamer = BlockStreamer("cuda", 2)
        streamer.add(model)
        torch.cuda.empty_cache()
        model(x, t, ctx[:1], seq)  # the ring fills
        streamed_s = forward_s()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(x, t, ctx[:1], seq)
            torch.cuda.synchronize()
    ov = copy_overlap(prof.events())  # the block copies (~0.7 GB, ~13 ms), not small uploads
    gpu_record(**ov, resident_forward_s=resident_s, streamed_forward_s=streamed_s, ratio=streamed_s / resident_s,
               copies=streamer.copies, on_demand=streamer.on_demand)
    assert ov["block_copies"] >= 5, ov
    assert ov["covered_fraction"] >= 0.8, ov
    assert streamed_s <= 1.1 * resident_s, (streamed_s, resident_s)


# ---- bounded activations: the FFN over token chunks ---------------------------------------------------------------
def test_ffn_chunks_keep_the_output_and_do_not_raise_the_peak(gpu_record):
    """One compiled A14B-width block at 480p tokens (32,760), batch 2 (batched CFG), bf16: the FFN over 4 token
    chunks gives the whole-FFN output within bf16 rounding and no higher activation peak (recorded per token: the
    memory plan's 84 KB per token and sample is the whole-FFN number). Measured on an H100 at a34a1b2: the same
    peak, 4.72 GB (72 KB per token and sample), with and without chunks: the FFN intermediate is not the compiled
    block's peak, so the chunks do not lower it there."""
    from wan.configs.model_config import A14B
    from wan.modules.attention import resolve_attention
    from wan.modules.model import WanModel
    from wan.testing.random_init import randomize_weights_on_device_
    from wan.utils.compile import compile_blocks

    cfg = A14B.__class__(**{**A14B.__dict__, "num_layers": 1})
    with torch.device("meta"):
        model = WanModel.from_config(cfg)
    model = randomize_weights_on_device_(model.to_empty(device="cuda").to(torch.bfloat16), 0).eval()
    model.requires_grad_(False)
    g = torch.Generator(device="cuda").manual_seed(0)
    lat = torch.randn(16, 21, 60, 104, device="cuda", generator=g)
    ctx = [torch.randn(n, 4096, device="cuda", generator=g).to(torch.bfloat16) for n in (40, 126)]
    t = torch.tensor([937, 937], device="cuda")
    out, peak = {}, {}
    for chunks in (0, 4):
        model.configure(resolve_attention("auto", torch.device("cuda")), fast_rope=True, fast_time_embedding=True,
                        ffn_chunks=chunks)
        compile_blocks(model)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model([lat, lat], t, ctx, 32760)  # compile at the real shape
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out[chunks] = model([lat, lat], t, ctx, 32760)[0]
            torch.cuda.synchronize()
            peak[chunks] = torch.cuda.max_memory_allocated() - base
    per_token = {c: p / (2 * 32760) / 1e3 for c, p in peak.items()}
    gpu_record(peak_gb={c: p / 1e9 for c, p in peak.items()}, kb_per_token_and_sample=per_token,
               chunked_vs_whole=rel(out[4], out[0]))
    assert rel(out[4], out[0]) < 1e-2, rel(out[4], out[0])
    assert peak[4] <= peak[0], peak


def test_i2v_tiny_on_gpu_offload_stream_and_fast(tiny_i2v_ckpt, gpu_record):
    """Image-to-video on the GPU (tiny I2V checkpoint): offload == resident and streamed == resident bit for bit,
    --fast (bf16 experts, compile, fast_encode) within bf16 rounding of the original path, the condition on the
    device with every forward."""
    import numpy as np
    from PIL import Image

    from wan.configs import WAN_CONFIGS
    from wan.image2video import WanI2V

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))

    def i2v(**options):
        pipe = WanI2V(WAN_CONFIGS["i2v-tiny"], tiny_i2v_ckpt, device="cuda", options=RuntimeOptions(**options))
        video, latent = pipe.generate(PROMPT, img, max_area=64 * 64, frame_num=9, sampling_steps=4, seed=11,
                                      return_latents=True)
        return video, latent, pipe

    off, res = i2v(offload_model=True), i2v(offload_model=False)
    streamed = i2v(stream_blocks=2, convert_model_dtype=True, compile=True)
    resident16 = i2v(offload_model=False, convert_model_dtype=True, compile=True)
    fast = i2v(**fast_options().__dict__)
    gpu_record(fast_vs_original_rel=rel(fast[1], res[1]), backends=fast[2].last_result.backends)
    assert torch.equal(off[1], res[1]) and torch.equal(off[0], res[0])
    assert torch.equal(streamed[1], resident16[1]) and torch.equal(streamed[0], resident16[0])
    assert fast[2].last_result.backends["vae_encode"].startswith("reuses") and rel(fast[1], res[1]) < 5e-2


# ---- step caching on the GPU (tiny model): exact when it never reuses, no recompiles, nothing streamed when it does --
def test_step_cache_on_gpu(tiny_ckpt, gpu_record):
    """--fast with compile on the GPU: MagCache that never reuses is the uncached run bit for bit; at its defaults
    (12 steps: steps 3, 4, 6, 7, 10 reused) nothing recompiles, and the block-streamed run equals the resident one
    bit for bit while streaming no block on a reused step. EasyCache runs under the same contract."""
    from torch._dynamo.utils import counters

    gen = {**GEN, "sampling_steps": 12}
    fast = fast_options(vae_dtype="bf16")
    pipe = pipe_for(tiny_ckpt, **fast.__dict__)
    plain = run(pipe, **gen)
    never = run(pipe, RuntimeOptions(**{**fast.__dict__, "cache": "magcache", "cache_max_skip": 0}), **gen)
    assert torch.equal(never[1], plain[1]) and torch.equal(never[0], plain[0])
    counters.clear()
    cached = run(pipe, RuntimeOptions(**{**fast.__dict__, "cache": "magcache"}), **gen)
    graphs = counters["stats"]["unique_graphs"]
    rec = pipe.last_result.cache
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = run(pipe, RuntimeOptions(**{**fast.__dict__, "cache": "magcache"}), **gen)
        run(pipe, RuntimeOptions(**{**fast.__dict__, "cache": "easycache", "cache_thresh": 1.0, "cache_warmup": 2}),
            **gen)
    easy = pipe.last_result.cache
    assert counters["stats"]["unique_graphs"] == graphs and torch.equal(again[1], cached[1])
    streamed_opts = {k: v for k, v in fast.__dict__.items() if k != "offload_model"}
    streamed_pipe = pipe_for(tiny_ckpt, **{**streamed_opts, "stream_blocks": 1})
    plain_streamed = run(streamed_pipe, **gen)
    copies = streamed_pipe.placement.streamer.copies
    cached_streamed = run(streamed_pipe, RuntimeOptions(**{**streamed_opts, "stream_blocks": 1, "cache": "magcache"}),
                          **gen)
    cached_copies = streamed_pipe.placement.streamer.copies - copies
    layers = streamed_pipe.high_noise_model.config.num_layers
    gpu_record(reused_steps=rec["reused_steps"], computed_calls=rec["computed_calls"], calls=rec["calls"],
               latent_rel_vs_uncached=rel(cached[1], plain[1]), easycache_reused_steps=easy["reused_steps"],
               copies_uncached=copies, copies_cached=cached_copies)
    assert rec["reused_steps"] == [3, 4, 6, 7, 10] and 0 < rel(cached[1], plain[1]) < 0.5
    assert torch.equal(plain_streamed[1], plain[1]) and torch.equal(cached_streamed[1], cached[1])
    # --fast batches the CFG branches: one forward, one pass of block copies, per step (calls count branches)
    assert copies - cached_copies == len(rec["reused_steps"]) * layers


def test_ti2v_tiny_on_gpu_offload_stream_and_fast(tiny_ti2v_ckpt, gpu_record):
    """TI2V on the GPU (tiny checkpoint, image mode): offload == resident and streamed == resident bit for bit,
    --fast (bf16 model, compile, per-sample time rows gathered per token) within bf16 rounding of the original path,
    the first latent frame the image's latent in every run."""
    import numpy as np
    from PIL import Image

    from wan.configs import WAN_CONFIGS
    from wan.textimage2video import WanTI2V

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))

    def ti2v(**options):
        pipe = WanTI2V(WAN_CONFIGS["ti2v-tiny"], tiny_ti2v_ckpt, device="cuda", options=RuntimeOptions(**options))
        video, latent = pipe.generate(PROMPT, img, max_area=128 * 128, frame_num=9, sampling_steps=4, seed=11,
                                      return_latents=True)
        return video, latent, pipe

    off, res = ti2v(offload_model=True), ti2v(offload_model=False)
    streamed = ti2v(stream_blocks=2, convert_model_dtype=True, compile=True)
    resident16 = ti2v(offload_model=False, convert_model_dtype=True, compile=True)
    fast = ti2v(**fast_options().__dict__)
    gpu_record(fast_vs_original_rel=rel(fast[1], res[1]), backends=fast[2].last_result.backends)
    assert torch.equal(off[1], res[1]) and torch.equal(off[0], res[0])
    assert torch.equal(streamed[1], resident16[1]) and torch.equal(streamed[0], resident16[0])
    assert all(torch.equal(r[1][:, :1], res[1][:, :1]) for r in (off, streamed, resident16, fast))
    assert fast[2].last_result.backends["time_embedding"] == "per sample" and rel(fast[1], res[1]) < 5e-2
