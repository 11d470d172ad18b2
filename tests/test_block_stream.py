"""Block streaming on the CPU (the same ring machinery, synchronous copies): the streamed placement computes the
resident one bit for bit, keeps the parameters' names and host data, prefetches in program order, works with
compile and every guidance, and refuses combinations it cannot serve."""
import pytest
import torch

from wan.block_stream import BlockStreamer
from wan.configs import WAN_CONFIGS
from wan.options import RuntimeOptions
from wan.testing.tiny import build_tiny_dit
from wan.text2video import WanT2V

GEN = dict(size=(64, 64), frame_num=5, shift=12.0, sample_solver="unipc", sampling_steps=4, guide_scale=(3.0, 4.0),
           seed=11)
PROMPT = "a cat boxing on a stage under bright light"


def pipe(tiny_ckpt, **options):
    return WanT2V(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, device="cpu", options=RuntimeOptions(**options))


def run(p, **kw):
    return p.generate(PROMPT, return_latents=True, **{**GEN, **kw})


@pytest.fixture(scope="module")
def resident(tiny_ckpt):
    return run(pipe(tiny_ckpt))


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_streamed_equals_resident_bit_for_bit(tiny_ckpt, resident, slots):
    p = pipe(tiny_ckpt, stream_blocks=slots)
    assert p.placement.name == "block-streamed" and p.options.stream_blocks == slots
    video, latent = run(p)
    assert torch.equal(latent, resident[1]) and torch.equal(video, resident[0])
    streamer = p.placement.streamer
    # 4 steps x 2 passes x 2 blocks; with 2 blocks per expert and >= 2 slots, each expert's blocks stay loaded
    assert streamer.copies >= 4 and streamer.on_demand >= 2
    for name, param in p.high_noise_model.named_parameters():  # names and host data unchanged after a run
        assert param.device.type == "cpu" and not name.startswith("_")


def test_streamed_with_every_guidance_and_fast_switches(tiny_ckpt):
    ref = pipe(tiny_ckpt)
    streamed = pipe(tiny_ckpt, stream_blocks=1)
    for kw, opts in ((dict(guide_scale=1.0), None), (dict(), RuntimeOptions(batched_cfg=True, fast_rope=True))):
        a = ref.generate(PROMPT, options=opts, return_latents=True, **{**GEN, **kw})[1]
        b = streamed.generate(PROMPT, return_latents=True, **{**GEN, **kw},
                              options=None if opts is None else RuntimeOptions(stream_blocks=1, batched_cfg=True,
                                                                               fast_rope=True))[1]
        assert torch.equal(a, b)


def test_one_expert_serving_both_noise_levels_is_streamed_once(tiny_ckpt, resident):
    from wan.placement import BlockStreamed

    p = pipe(tiny_ckpt)
    p.low_noise_model = p.high_noise_model
    p.placement = BlockStreamed(p.device, False, 2)
    p.placement.attach({"high": p.high_noise_model, "low": p.low_noise_model}, p.text_encoder)
    assert len(p.placement.streamer.host) == 1 and len(p.high_noise_model.blocks[0]._forward_pre_hooks) == 1
    run(p)


def test_t5_is_streamed_by_layers_and_its_ring_given_back(tiny_ckpt):
    """Streamed, T5's blocks go through their own 2-slot ring (the embedding looked up on the host): the same
    embeddings as the resident placement's, the ring freed after each encode and allocated again for the next."""
    ref = pipe(tiny_ckpt)
    p = pipe(tiny_ckpt, stream_blocks=2)
    ring = p.placement.t5_streamer
    assert "T5 in host memory streamed by layers through 2 device slots" in p.placement.describe()
    for i in range(2):
        out = p.placement.encode([PROMPT, "two dogs"])
        want = ref.placement.encode([PROMPT, "two dogs"])
        assert all(torch.equal(a, b) for a, b in zip(out, want)) and out[0].abs().mean() > 0
        assert ring.slots is None and ring.copies >= 2 * (i + 1)
    names = {n for n, _ in p.text_encoder.model.named_parameters()}
    assert names == {n for n, _ in ref.text_encoder.model.named_parameters()}
    assert pipe(tiny_ckpt, stream_blocks=2, t5_cpu=True).placement.t5_streamer is None


def test_resident_run_with_t5_stream_encodes_the_same_and_generates_the_same(tiny_ckpt, resident):
    """--t5_stream on a resident run: T5 through its 2-slot ring, experts resident; the same embeddings and the same
    video bit for bit as the whole-copy encode."""
    ref = pipe(tiny_ckpt)
    p = pipe(tiny_ckpt, offload_model=False, t5_stream=True)
    assert p.placement.name == "resident" and p.placement.t5_streamer is not None
    assert "resident: experts on" in p.placement.describe() and "T5 in host memory streamed by layers" in \
        p.placement.describe()
    out, want = p.placement.encode([PROMPT, "two dogs"]), ref.placement.encode([PROMPT, "two dogs"])
    assert all(torch.equal(a, b) for a, b in zip(out, want)) and p.placement.t5_streamer.slots is None
    video, latent = run(p)
    assert torch.equal(latent, resident[1]) and torch.equal(video, resident[0])


@pytest.mark.parametrize("bad", [dict(t5_cpu=True), dict(offload_model=True), dict(t5_fsdp=True)])
def test_t5_stream_refused_where_it_cannot_apply(bad):
    from wan.options import RuntimeOptions

    with pytest.raises(ValueError, match="--t5_stream"):
        RuntimeOptions(t5_stream=True, **bad)


def test_streamer_prefetches_in_program_order():
    model = build_tiny_dit(1)
    ref = build_tiny_dit(1)
    streamer = BlockStreamer("cpu", 1)
    streamer.add(model)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(16, 2, 8, 8, generator=g), [torch.randn(5, 4096, generator=g)]
    with torch.no_grad():
        for t in (999, 500):
            out = model([x], torch.tensor([t]), ctx, 32)[0]
            assert torch.equal(out, ref([x], torch.tensor([t]), ctx, 32)[0])
    # 1 slot, 2 blocks: block 0 on demand once; afterwards each block is prefetched by the one before it
    assert streamer.on_demand == 1 and streamer.copies == 1 + 2 * 2
    assert set(model.state_dict()) == set(ref.state_dict())


def test_non_cyclic_streamer_does_not_prefetch_the_next_pass():
    """The text encoder's ring (cyclic=False): no copy of block 0 after the last block, as the ring is released."""
    model = build_tiny_dit(1)
    streamer = BlockStreamer("cpu", 1, cyclic=False)
    streamer.add(model)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(16, 2, 8, 8, generator=g), [torch.randn(5, 4096, generator=g)]
    with torch.no_grad():
        for t in (999, 500):
            model([x], torch.tensor([t]), ctx, 32)
    # per pass: block 0 on demand, block 1 prefetched by block 0, nothing after block 1
    assert streamer.on_demand == 2 and streamer.copies == 2 * 2


def test_streamed_with_compile_never_recompiles(tiny_ckpt, resident):
    from torch._dynamo.utils import counters

    counters.clear()
    p = pipe(tiny_ckpt, stream_blocks=2, compile=True)
    video, latent = run(p)
    assert (latent - resident[1]).abs().max() < 1e-4
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(p)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("kw,needle", [(dict(stream_blocks=2, offload_model=True), "cannot be combined"),
                                       (dict(stream_blocks=-1), "stream_blocks"),
                                       (dict(stream_blocks=2, compile=True, compile_mode="max-autotune"),
                                        "CUDA graphs")])
def test_bad_combinations(tiny_ckpt, kw, needle):
    with pytest.raises(ValueError, match=needle):
        pipe(tiny_ckpt, **kw)
