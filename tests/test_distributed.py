"""Multi-rank paths on CPU with gloo: Ulysses SP, CFG parallel, FSDP2 (DiT and T5), the three combined, the whole
generate.py pipeline under two ranks, a failing rank ending every rank, and the world-size checks.

Ranks are real processes (spawn). Each rank also computes the single-process result itself from the same seeded
weights, so every comparison is "this rank's parallel result vs the plain model", fp32, relative max difference.
"""
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOL = 1e-5  # relative, fp32
PIPE_TOL = 1e-4
WORKER_TIMEOUT_S = 120


# ---- process helpers ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, env, out_dir, args):
    """Child process: torchrun-like env, then fn(rank, world, out_dir, *args); a traceback lands in a file."""
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        fn(rank, world, Path(out_dir), *args)
    except BaseException:  # noqa: BLE001
        (Path(out_dir) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def run_ranks(fn, world, out_dir, *args, timeout=WORKER_TIMEOUT_S):
    """Start `world` processes running fn; wait (bounded); return their exit codes. Leftovers are killed."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WAN_DIST_TIMEOUT_MINUTES": "1.5"}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, env, str(out_dir), args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = "\n".join(f.read_text() for f in sorted(Path(out_dir).glob("error*.txt")))
    assert not hung, f"{len(hung)} rank(s) still running after {timeout} s\n{errors}"
    return [p.exitcode for p in procs], errors


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _init_gloo(rank, world):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)


# ---- the model-level checks, run inside the ranks -------------------------------------------------------------------
def _inputs():
    """Batch 2 with different grids: 45 and 30 real tokens (45 is odd, so seq_len 46 has one padded token)."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 3, 6, 10, generator=g), torch.randn(16, 2, 6, 10, generator=g)]
    ctx = [torch.randn(7, 4096, generator=g), torch.randn(12, 4096, generator=g)]
    return x, torch.tensor([937, 500]), ctx, 46


def _check_ulysses(group, results):
    """(a) Ulysses SP over `group` == single process, reference and fast RoPE / time embedding; survives configure."""
    from wan.distributed.ulysses import UlyssesAttention
    from wan.modules.attention import AttentionBackend
    from wan.testing.tiny import build_tiny_dit

    x, t, ctx, seq_len = _inputs()
    plain, sp = build_tiny_dit(11), build_tiny_dit(11)
    sp.set_sequence_parallel(group)
    for fast in (False, True):
        plain.configure(fast_rope=fast, fast_time_embedding=fast)
        sp.configure(fast_rope=fast, fast_time_embedding=fast)  # the layout survives any reconfiguration
        sp.set_sequence_parallel(group)  # idempotent
        for block in sp.blocks:
            assert isinstance(block.self_attn.attention, UlyssesAttention)
            assert isinstance(block.self_attn.attention.inner, AttentionBackend)  # wrapped once
            assert isinstance(block.cross_attn.attention, AttentionBackend)  # cross-attention stays local
        with torch.no_grad():
            ref, out = plain(x, t, ctx, seq_len), sp(x, t, ctx, seq_len)
        results[f"ulysses_{'fast' if fast else 'reference'}"] = max(rel(o, r) for o, r in zip(out, ref))
        name = f"ulysses_{'fast' if fast else 'reference'}"
        with torch.no_grad():
            # batch 1 as the pipeline calls it (45 real tokens of 46)
            results[name + "_b1"] = rel(sp(x[:1], t[:1], ctx[:1], seq_len)[0], plain(x[:1], t[:1], ctx[:1], seq_len)[0])
            # a different timestep per token ([B, seq_len]): e0 and e are split with the tokens
            tt = torch.randint(0, 1000, (2, seq_len), generator=torch.Generator().manual_seed(1))
            results[name + "_per_token_t"] = max(rel(o, r) for o, r in zip(sp(x, tt, ctx, seq_len),
                                                                            plain(x, tt, ctx, seq_len)))


def _check_cfg(model_seed, cfg_group, cfg_rank, results, key, model_fn=None):
    """(b) cfg_parallel_prediction == uncond + g * (cond - uncond) of the plain model, identical on every rank."""
    import torch.distributed as dist

    from wan.distributed.cfg_parallel import cfg_parallel_prediction
    from wan.testing.tiny import build_tiny_dit

    x, t, ctx, _ = _inputs()
    lat, seq_len, g = x[0], 46, 3.5
    plain = build_tiny_dit(model_seed)
    model = model_fn(build_tiny_dit(model_seed)) if model_fn else plain
    with torch.no_grad():
        cond = plain([lat], t[:1], ctx[:1], seq_len)[0]
        uncond = plain([lat], t[:1], ctx[1:], seq_len)[0]
        ref = uncond + g * (cond - uncond)
        pred = cfg_parallel_prediction(model, lat, t[:1], ctx[:1], ctx[1:], seq_len, g, cfg_group, cfg_rank)
    results[key] = rel(pred, ref)
    every = [torch.empty_like(pred) for _ in range(dist.get_world_size())]
    dist.all_gather(every, pred)
    results[key + "_same_on_all_ranks"] = all(torch.equal(every[0], u) for u in every)


def _check_fsdp(results, tiny_ckpt):
    """(c) FSDP2-sharded DiT == plain; the T5 sharded per block == plain."""
    from torch.distributed.tensor import DTensor

    from wan.configs import WAN_CONFIGS
    from wan.distributed.fsdp import shard_model, shard_t5
    from wan.modules.t5 import T5EncoderModel
    from wan.testing.tiny import build_tiny_dit

    x, t, ctx, seq_len = _inputs()
    plain, sharded = build_tiny_dit(13), build_tiny_dit(13)
    shard_model(sharded, None, param_dtype=torch.float32)
    w = sharded.blocks[0].ffn[0].weight
    results["fsdp_sharded"] = isinstance(w, DTensor) and w.to_local().shape[0] == w.shape[0] // 2
    with torch.no_grad():
        ref, out = plain(x, t, ctx, seq_len), sharded(x, t, ctx, seq_len)
        again = sharded(x, t, ctx, seq_len)  # second call: gathers again after the reshard
    results["fsdp"] = max(rel(o, r) for o, r in zip(out, ref))
    results["fsdp_repeat_equal"] = all(torch.equal(a, b) for a, b in zip(out, again))
    with torch.no_grad():  # step caching's forward gathers the root's parameters too (register_fsdp_forward_method)
        (ref_out, ref_r), (out, r) = plain.forward_residual(x, t, ctx, seq_len), sharded.forward_residual(
            x, t, ctx, seq_len)
        reused = sharded.forward_residual(x, t, ctx, seq_len, reuse=r)[0]
        ref_reused = plain.forward_residual(x, t, ctx, seq_len, reuse=ref_r)[0]
    results["fsdp_residual"] = max([rel(r, ref_r)] + [rel(o, w) for o, w in zip(out + reused, ref_out + ref_reused)])

    cfg = WAN_CONFIGS["t2v-tiny"]
    kw = dict(text_len=cfg.text_len, dtype=cfg.t5_dtype, checkpoint_path=str(Path(tiny_ckpt) / cfg.t5_checkpoint),
              tokenizer_path=str(Path(tiny_ckpt) / cfg.t5_tokenizer))
    t5_plain = T5EncoderModel(**kw)
    t5_sharded = T5EncoderModel(**kw, shard_fn=lambda m: shard_t5(m, None))
    prompts = ["two cats fight on a stage", "a dog runs through tall grass at sunset"]
    a, b = t5_plain(prompts, torch.device("cpu")), t5_sharded(prompts, torch.device("cpu"))
    results["t5_fsdp"] = max(rel(u.float(), v.float()) for u, v in zip(b, a))
    results["t5_fsdp_shapes"] = [tuple(u.shape) for u in a] == [tuple(u.shape) for u in b]


def _worker_two_ranks(rank, world, out_dir, tiny_ckpt):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    _init_gloo(rank, world)
    results = {}
    sp_mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("cfg", "sp"))
    _check_ulysses(sp_mesh["sp"].get_group(), results)
    cfg_mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("cfg", "sp"))
    _check_cfg(12, cfg_mesh["cfg"].get_group(), cfg_mesh.get_local_rank("cfg"), results, "cfg")
    _check_fsdp(results, tiny_ckpt)
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


def _worker_four_ranks(rank, world, out_dir):
    """(d) ulysses 2 x cfg 2, both experts' worth of FSDP over all 4 ranks (as WanT2V builds it)."""
    import torch.distributed as dist

    from wan.distributed.fsdp import shard_model
    from wan.distributed.setup import parallel_groups
    from wan.options import RuntimeOptions

    _init_gloo(rank, world)
    groups = parallel_groups(RuntimeOptions(ulysses_size=2, cfg_parallel=True, dit_fsdp=True), torch.device("cpu"))

    def parallel(model):
        shard_model(model, groups.fsdp_mesh, param_dtype=torch.float32)
        return model.set_sequence_parallel(groups.sp_group)

    results = {"cfg_rank": groups.cfg_rank, "sp_rank": dist.get_rank(groups.sp_group)}
    _check_cfg(14, groups.cfg_group, groups.cfg_rank, results, "combined", model_fn=parallel)
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory, tiny_ckpt):
    out = tmp_path_factory.mktemp("two_ranks")
    codes, errors = run_ranks(_worker_two_ranks, 2, out, str(tiny_ckpt))
    assert codes == [0, 0], errors
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("variant", ["reference", "fast"])
def test_ulysses_matches_single_process(two_rank_results, variant):
    for res in two_rank_results:
        assert res[f"ulysses_{variant}"] <= TOL, res
        assert res[f"ulysses_{variant}_b1"] <= TOL, res
        assert res[f"ulysses_{variant}_per_token_t"] <= TOL, res


def test_cfg_parallel_matches_sequential_cfg(two_rank_results):
    for res in two_rank_results:
        assert res["cfg"] <= TOL and res["cfg_same_on_all_ranks"], res


def test_fsdp_matches_single_process(two_rank_results):
    for res in two_rank_results:
        assert res["fsdp_sharded"] and res["fsdp_repeat_equal"], res
        assert res["fsdp"] <= TOL and res["fsdp_residual"] <= TOL, res
        assert res["t5_fsdp_shapes"] and res["t5_fsdp"] <= TOL, res


def test_ulysses_cfg_fsdp_combined_four_ranks(tmp_path):
    codes, errors = run_ranks(_worker_four_ranks, 4, tmp_path)
    assert codes == [0] * 4, errors
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    assert sorted((r["cfg_rank"], r["sp_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for res in results:
        assert res["combined"] <= TOL and res["combined_same_on_all_ranks"], res


# ---- the whole pipeline through generate.py -------------------------------------------------------------------------
def _gen_argv(ckpt, save_file, *extra):
    return ["--task", "t2v-tiny", "--ckpt_dir", str(ckpt), "--device", "cpu", "--size", "64*64", "--frame_num", "5",
            "--sample_steps", "2", "--base_seed", "42", "--prompt", "two cats box on a stage",
            "--save_file", str(save_file), *extra]


def _capture_generate(out_file, fail_on_rank=None):
    """Make WanT2V.generate save its latent and video to `out_file` (optionally fail on one rank mid-denoising)."""
    import wan.text2video as t2v

    orig = t2v.WanT2V.generate

    def generate(self, *args, **kwargs):
        if fail_on_rank is not None and self.rank == fail_on_rank:
            def boom(*a, **k):
                raise RuntimeError(f"injected failure on rank {self.rank}")
            self.high_noise_model.forward = boom  # fails at the first denoising step
        video = orig(self, *args, **kwargs)
        torch.save({"latent": self.last_result.latent, "video": video, "sp_size": self.sp_size}, out_file)
        return video

    t2v.WanT2V.generate = generate
    return orig


def _worker_generate(rank, world, out_dir, argv, fail_on_rank):
    import generate

    _capture_generate(out_dir / f"gen{rank}.pt", fail_on_rank)
    code = generate.main(argv)
    (out_dir / f"code{rank}").write_text(str(code))


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, tiny_ckpt):
    import generate
    import wan.text2video as t2v

    out = tmp_path_factory.mktemp("single")
    orig = _capture_generate(out / "gen.pt")
    try:
        assert generate.main(_gen_argv(tiny_ckpt, out / "v.mp4")) == 0
    finally:
        t2v.WanT2V.generate = orig
    return torch.load(out / "gen.pt")


@pytest.mark.parametrize("flags", [["--ulysses_size", "2"], ["--cfg_parallel", "--dit_fsdp", "--t5_fsdp"]],
                         ids=["ulysses2", "cfg_parallel+dit_fsdp+t5_fsdp"])
def test_generate_two_ranks_matches_single_process(tmp_path, tiny_ckpt, single_process_run, flags):
    argv = _gen_argv(tiny_ckpt, tmp_path / "v.mp4", *flags)
    codes, errors = run_ranks(_worker_generate, 2, tmp_path, argv, None)
    assert codes == [0, 0] and [(tmp_path / f"code{r}").read_text() for r in range(2)] == ["0", "0"], errors
    ref = single_process_run
    r0, r1 = (torch.load(tmp_path / f"gen{r}.pt") for r in range(2))
    assert r0["sp_size"] == (2 if "--ulysses_size" in flags else 1)
    assert torch.equal(r0["latent"], r1["latent"])  # every rank holds the same latent
    assert rel(r0["latent"], ref["latent"]) <= PIPE_TOL
    assert r1["video"] is None and rel(r0["video"], ref["video"]) <= PIPE_TOL  # only rank 0 decodes
    assert (tmp_path / "v.mp4").stat().st_size > 0


def test_distilled_lora_ulysses_two_ranks_matches_single_process(tmp_path, tiny_ckpt):
    """--distilled with a LoRA (Euler, guidance 1: one pass per step) under Ulysses on 2 ranks == one process."""
    import generate
    import wan.text2video as t2v
    from wan.configs.model_config import TINY
    from wan.testing.random_lora import write_random_lora_dir

    lora = write_random_lora_dir(tmp_path / "lora", TINY, rank=4, seed=9)
    flags = ["--distilled", "--lora_dir", str(lora)]
    orig = _capture_generate(tmp_path / "single.pt")
    try:
        assert generate.main(_gen_argv(tiny_ckpt, tmp_path / "single.mp4", *flags)) == 0
    finally:
        t2v.WanT2V.generate = orig
    ref = torch.load(tmp_path / "single.pt")
    argv = _gen_argv(tiny_ckpt, tmp_path / "v.mp4", *flags, "--ulysses_size", "2")
    codes, errors = run_ranks(_worker_generate, 2, tmp_path, argv, None)
    assert codes == [0, 0] and [(tmp_path / f"code{r}").read_text() for r in range(2)] == ["0", "0"], errors
    r0 = torch.load(tmp_path / "gen0.pt")
    assert r0["sp_size"] == 2 and rel(r0["latent"], ref["latent"]) <= PIPE_TOL


# ---- image-to-video: the condition y goes with the tokens (Ulysses) and with both CFG halves ------------------------
def _i2v_argv(ckpt, image, save_file, *extra):
    return ["--task", "i2v-tiny", "--ckpt_dir", str(ckpt), "--device", "cpu", "--size", "64*64", "--frame_num", "5",
            "--sample_steps", "2", "--base_seed", "42", "--prompt", "two cats box on a stage", "--image", str(image),
            "--save_file", str(save_file), *extra]


def _capture_i2v(out_file):
    import wan.image2video as i2v

    orig = i2v.WanI2V.generate

    def generate(self, *args, **kwargs):
        video = orig(self, *args, **kwargs)
        torch.save({"latent": self.last_result.latent, "video": video, "sp_size": self.sp_size,
                    "guidance": self.last_result.backends["guidance"]}, out_file)
        return video

    i2v.WanI2V.generate = generate
    return orig


def _worker_generate_i2v(rank, world, out_dir, argv):
    import generate

    _capture_i2v(out_dir / f"gen{rank}.pt")
    (out_dir / f"code{rank}").write_text(str(generate.main(argv)))


def test_i2v_ulysses_and_cfg_parallel_match_single_process(tmp_path, tiny_i2v_ckpt):
    """i2v-tiny on 4 ranks, Ulysses 2 x CFG parallel (y sharded with the tokens, and given to both CFG halves): one
    process's result."""
    import numpy as np
    from PIL import Image

    import generate
    import wan.image2video as i2v

    image = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(image)
    orig = _capture_i2v(tmp_path / "single.pt")
    try:
        assert generate.main(_i2v_argv(tiny_i2v_ckpt, image, tmp_path / "single.mp4")) == 0
    finally:
        i2v.WanI2V.generate = orig
    ref = torch.load(tmp_path / "single.pt")
    out = tmp_path / "ranks"
    out.mkdir()
    argv = _i2v_argv(tiny_i2v_ckpt, image, out / "v.mp4", "--ulysses_size", "2", "--cfg_parallel")
    codes, errors = run_ranks(_worker_generate_i2v, 4, out, argv)
    assert codes == [0] * 4 and [(out / f"code{r}").read_text() for r in range(4)] == ["0"] * 4, errors
    runs = [torch.load(out / f"gen{r}.pt") for r in range(4)]
    assert all(r["sp_size"] == 2 and torch.equal(r["latent"], runs[0]["latent"]) for r in runs)
    assert runs[0]["guidance"]["high"].startswith("CFG parallel")
    assert rel(runs[0]["latent"], ref["latent"]) <= PIPE_TOL and rel(runs[0]["video"], ref["video"]) <= PIPE_TOL


# ---- step caching: the residual sharded with the tokens (Ulysses), one decision on every rank (CFG parallel) -------
CACHE_GEN = dict(size=(64, 64), frame_num=1, shift=12.0, sample_solver="unipc", sampling_steps=12,
                 guide_scale=(3.0, 4.0), seed=3)


def _cache_runs(calibrate_to):
    """Per-call cache options: MagCache at its defaults, EasyCache reusing every step it may (a threshold far above
    any error: the same decisions on every machine), a calibration run."""
    return {"magcache": dict(cache="magcache"),
            "easycache": dict(cache="easycache", cache_thresh=10.0, cache_warmup=2),
            "calibrate": dict(cache_calibrate=str(calibrate_to))}


def _worker_step_cache(rank, world, out_dir, tiny_ckpt):
    import torch.distributed as dist

    from wan.configs import WAN_CONFIGS
    from wan.options import RuntimeOptions
    from wan.text2video import WanT2V

    _init_gloo(rank, world)
    layout = dict(ulysses_size=2, cfg_parallel=True)
    pipe = WanT2V(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, device="cpu", rank=rank, options=RuntimeOptions(**layout))
    results = {}
    for name, opts in _cache_runs(out_dir / "ratios.json").items():
        _, latent = pipe.generate("two cats box on a stage", options=RuntimeOptions(**layout, **opts),
                                  return_latents=True, **CACHE_GEN)
        results[name] = (latent, pipe.last_result.cache)
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_step_caches_under_ulysses_and_cfg_parallel_match_one_process(tmp_path, tiny_ckpt, tiny_pipe):
    """4 ranks (Ulysses 2 x CFG parallel): MagCache (each rank keeps its share of the residual), EasyCache (the
    cond half's decision shared with the uncond half) and a calibration (ratios summed over the SP group, gathered
    over the CFG pair): the single process's latents, decisions and ratios."""
    import json

    from wan.options import RuntimeOptions

    codes, errors = run_ranks(_worker_step_cache, 4, tmp_path, str(tiny_ckpt), timeout=240)
    assert codes == [0] * 4, errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for name, opts in _cache_runs(tmp_path / "single.json").items():
        _, latent = tiny_pipe.generate("two cats box on a stage", options=RuntimeOptions(**opts), return_latents=True,
                                       **CACHE_GEN)
        rec = tiny_pipe.last_result.cache
        for got, got_rec in (r[name] for r in ranks):
            assert torch.equal(got, ranks[0][name][0]) and rel(got, latent) <= PIPE_TOL, name
            assert got_rec["steps"] == rec["steps"] and got_rec["computed_calls"] == rec["computed_calls"], name
        assert rec["reused_steps"] or name == "calibrate"
    mine, single = (json.loads((tmp_path / f).read_text()) for f in ("ratios.json", "single.json"))
    assert mine["branches"] == single["branches"] == ["cond", "uncond"]
    assert mine["ratios"] == pytest.approx(single["ratios"], abs=1e-5)


def test_failing_rank_ends_every_rank(tmp_path, tiny_ckpt):
    """Rank 1 fails at its first denoising step while rank 0 waits in an all-to-all: both exit non-zero, quickly."""
    argv = _gen_argv(tiny_ckpt, tmp_path / "v.mp4", "--ulysses_size", "2")
    start = time.monotonic()
    codes, errors = run_ranks(_worker_generate, 2, tmp_path, argv, 1, timeout=60)
    assert codes == [0, 0], errors  # the processes themselves end normally: main() returns an exit code
    assert [(tmp_path / f"code{r}").read_text() for r in range(2)] == ["1", "1"]
    assert time.monotonic() - start < 60 and not (tmp_path / "v.mp4").exists()


# ---- (f) world-size / layout checks (no processes) -----------------------------------------------------------------
@pytest.mark.parametrize("world,kw,needle", [
    (3, dict(ulysses_size=2), "world size 3 must equal ulysses_size (2) x 1"),
    (2, dict(ulysses_size=2, cfg_parallel=True), "world size 2 must equal ulysses_size (2) x 2"),
    (8, dict(ulysses_size=2, cfg_parallel=True), "world size 8 must equal"),
    (3, dict(ulysses_size=3), "must divide the 40 attention heads"),
    (1, dict(ulysses_size=2), "need torchrun"),
    (1, dict(cfg_parallel=True), "need torchrun"),
    (1, dict(dit_fsdp=True), "need torchrun"),
])
def test_bad_parallel_layout_one_line_error(world, kw, needle):
    from wan.options import RuntimeOptions, check_parallel_layout

    with pytest.raises(ValueError) as err:
        check_parallel_layout(RuntimeOptions(**kw), world)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("world,kw", [(2, dict(ulysses_size=2)), (4, dict(ulysses_size=2, cfg_parallel=True)),
                                      (2, dict(cfg_parallel=True, dit_fsdp=True)), (8, dict(ulysses_size=8)),
                                      (1, dict())])
def test_good_parallel_layout_accepted(world, kw):
    from wan.options import RuntimeOptions, check_parallel_layout

    check_parallel_layout(RuntimeOptions(**kw), world)


def test_dist_timeout_is_finite_and_configurable(monkeypatch):
    from datetime import timedelta

    from wan.distributed.setup import TIMEOUT_ENV, dist_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert dist_timeout() == timedelta(minutes=15)
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert dist_timeout() == timedelta(minutes=2.5)
    for bad in ("0", "soon"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            dist_timeout()
