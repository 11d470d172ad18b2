"""Step caching (wan/step_cache.py) on the tiny random models (CPU).

The published rules are re-implemented here from the facts file and the published code (MagCache4Wan2.2's
`magcache_forward` / `init_magcache` / `nearest_interp`, EasyCache4Wan2.2's `easycache_forward_`), independently of
ours (they call the model's embed / blocks / head, or its plain forward, not `forward_residual`). Our pipeline is
checked against them: the same decisions and latents within 1e-5, except where we deliberately differ (one decision
per step for both CFG branches, nothing carried across the expert switch, the last step computed): each difference
is tested explicitly. Off, never-skip settings and calibration runs are the uncached run bit for bit.
"""
import json
import math

import numpy as np
import pytest
import torch

from wan.configs import WAN_CONFIGS
from wan.options import RuntimeOptions
from wan.step_cache import DATA, MIN_STEPS, load_ratios, magcache_schedule, write_ratios
from wan.text2video import WanT2V
from wan.utils.schedulers import build_scheduler, expert_for_timestep

PROMPT, NEG = "a cat boxing on a stage under bright light", "static, blurry"
GEN = dict(size=(64, 64), frame_num=1, shift=12.0, sample_solver="unipc", sampling_steps=40, guide_scale=(3.0, 4.0),
           seed=3)
SHORT = {**GEN, "sampling_steps": 12}  # mechanics: 8 high-noise + 4 low-noise steps

# The facts file, section 1 (magcache_generate.py line 695): T2V-A14B, interleaved cond / uncond for steps 1..39.
PUBLISHED_T2V = [
    1.00124, 1.00155, 0.99822, 0.99851, 0.99696, 0.99687, 0.99703, 0.99732, 0.9966, 0.99679,
    0.99602, 0.99658, 0.99578, 0.99664, 0.99484, 0.9949, 0.99633, 0.996, 0.99659, 0.99683,
    0.99534, 0.99549, 0.99584, 0.99577, 0.99681, 0.99694, 0.99563, 0.99554, 0.9944, 0.99473,
    0.99594, 0.9964, 0.99466, 0.99461, 0.99453, 0.99481, 0.99389, 0.99365, 0.99391, 0.99406,
    0.99354, 0.99361, 0.99283, 0.99278, 0.99268, 0.99263, 0.99057, 0.99091, 0.99125, 0.99126,
    0.65523, 0.65252, 0.98808, 0.98852, 0.98765, 0.98736, 0.9851, 0.98535, 0.98311, 0.98339,
    0.9805, 0.9806, 0.97776, 0.97771, 0.97278, 0.97286, 0.96731, 0.96728, 0.95857, 0.95855,
    0.94385, 0.94385, 0.92118, 0.921, 0.88108, 0.88076, 0.80263, 0.80181]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def trace_for(steps, shift=12.0, boundary=875):
    _, ts = build_scheduler("unipc", steps, shift, "cpu", 1000)
    return [expert_for_timestep(t, boundary) for t in ts.tolist()]


def reused(schedule):
    return [i for i, c in enumerate(schedule) if not c]


def published_ratio_file(task="t2v"):
    return json.loads((DATA / f"magcache_{task}_A14B.json").read_text())["ratios"]


# ---- the published MagCache, re-implemented -------------------------------------------------------------------------
def published_nearest_interp(src, target_length):
    src = np.asarray(src)
    if target_length == 1:
        return np.array([src[-1]])
    scale = (len(src) - 1) / (target_length - 1)
    return src[np.round(np.arange(target_length) * scale).astype(int)]


def published_mag_ratios(ratios, steps):
    """init_magcache: [1.0, 1.0] + ratios, resampled per branch when the length is not 2 x steps."""
    mag = np.array([1.0] * 2 + list(ratios))
    if len(mag) != steps * 2:
        con, ucon = published_nearest_interp(mag[0::2], steps), published_nearest_interp(mag[1::2], steps)
        mag = np.concatenate([con.reshape(-1, 1), ucon.reshape(-1, 1)], axis=1).reshape(-1)
    return mag


class PublishedMagCache:
    """magcache_forward's decision (one counter and one state for both experts, per parity cnt % 2), with t2v or i2v
    retention; `reset_at_switch` clears the accumulators at the low-noise expert's first call (our difference)."""

    def __init__(self, ratios, steps, high_steps, thresh, k, rr, mode="t2v", reset_at_switch=False):
        self.mag = published_mag_ratios(ratios, steps)
        self.num, self.split, self.thresh, self.k, self.rr, self.mode = 2 * steps, 2 * high_steps, thresh, k, rr, mode
        self.reset_at_switch = reset_at_switch
        self.cnt, self.ratio, self.steps_, self.err = 0, [1.0, 1.0], [0, 0], [0.0, 0.0]
        self.residual = [None, None]
        self.skipped = [[], []]

    def decide(self) -> bool:
        """True: skip this call. Advances the counter."""
        cnt, b = self.cnt, self.cnt % 2
        if self.reset_at_switch and cnt in (self.split, self.split + 1):
            self.ratio[b], self.steps_[b], self.err[b] = 1.0, 0, 0.0
        if self.mode == "i2v":
            use = not cnt < int(self.split + (self.num - self.split) * self.rr)
        else:
            use = not (cnt < int(self.split * self.rr) or (self.split <= cnt <= (self.num - self.split) * self.rr
                                                            + self.split))
        skip = False
        if use:
            self.ratio[b] *= self.mag[cnt]
            self.steps_[b] += 1
            self.err[b] += abs(1 - self.ratio[b])
            if self.err[b] < self.thresh and self.steps_[b] <= self.k:
                skip = True
            else:
                self.ratio[b], self.steps_[b], self.err[b] = 1.0, 0, 0.0
        if skip:
            self.skipped[b].append(cnt // 2)
        self.cnt += 1
        return skip

    def forward(self, model, x, t, context, seq_len):
        """The published forward on our model's parts (embed, blocks, head, unpatchify)."""
        b, skip = self.cnt % 2, self.decide()
        xs, e, e0, seq_lens, grids, rope, ctx = model.embed([x], t, [context], seq_len)
        if skip:
            xs = xs + self.residual[b]
        else:
            ori = xs
            for block in model.blocks:
                xs = block(xs, e0, seq_lens, rope, ctx, None)
            self.residual[b] = xs - ori
        return model.unpatchify(model.head(xs, e), grids)[0].float()


def replay(ratios, steps, high_steps, thresh, k, rr, **kw):
    """The published decisions without a model: (cond skipped steps, uncond skipped steps)."""
    pub = PublishedMagCache(ratios, steps, high_steps, thresh, k, rr, **kw)
    for _ in range(2 * steps):
        pub.decide()
    return pub.skipped


# ---- the published EasyCache, re-implemented ------------------------------------------------------------------------
class PublishedEasyCache:
    """easycache_forward_ (T2V/I2V-A14B): module-level state shared by both experts, decided on the cond (even) calls,
    the uncond call follows. `reset_at_switch`: a fresh state at the low-noise expert's first call (our difference)."""

    def __init__(self, steps, thresh, ret_steps, switch_step=None):
        self.cnt, self.num_steps, self.thresh, self.ret = 0, 2 * steps, thresh, 2 * ret_steps
        self.switch_call = None if switch_step is None else 2 * switch_step
        self._fresh()
        self.computed = []

    def _fresh(self):
        self.acc, self.calc, self.k = 0, True, None
        self.prev_in = self.prev_out_even = self.prev_out_odd = self.prev_prev_in = None
        self.cache_even = self.cache_odd = None

    def forward(self, model, x, t, context, seq_len):
        if self.cnt == self.switch_call:
            self._fresh()
        raw = [x.clone()]
        even = self.cnt % 2 == 0
        if even:
            if self.cnt < self.ret or self.cnt >= self.num_steps - 2:
                self.calc, self.acc = True, 0
            elif self.prev_in is not None and self.prev_out_even is not None:
                change = torch.cat([(u - v).flatten() for u, v in zip(raw, self.prev_in)]).abs().mean()
                if self.k is not None:
                    norm = torch.cat([u.flatten() for u in self.prev_out_even]).abs().mean()
                    self.acc += self.k * (change / norm)
                    if self.acc < self.thresh:
                        self.calc = False
                    else:
                        self.calc, self.acc = True, 0
                else:
                    self.calc = True
            else:
                self.calc = True
            self.prev_in = [u.clone() for u in raw]
            self.computed.append(self.calc)
        if even and not self.calc and self.prev_out_even is not None:
            self.cnt += 1
            return [(u + v).float() for u, v in zip(raw, self.cache_even)][0]
        if not even and not self.calc and self.prev_out_odd is not None:
            self.cnt += 1
            return [(u + v).float() for u, v in zip(raw, self.cache_odd)][0]
        out = model([x], t=t, context=[context], seq_len=seq_len)
        if even:
            if self.prev_out_even is not None:
                out_change = torch.cat([(u - v).flatten() for u, v in zip(out, self.prev_out_even)]).abs().mean()
                if self.prev_prev_in is not None:
                    in_change = torch.cat([(u - v).flatten() for u, v in zip(self.prev_in, self.prev_prev_in)]
                                          ).abs().mean()
                    self.k = out_change / in_change
            self.prev_prev_in = self.prev_in
            self.prev_out_even = [u.clone() for u in out]
            self.cache_even = [u - v for u, v in zip(out, raw)]
        else:
            self.prev_out_odd = [u.clone() for u in out]
            self.cache_odd = [u - v for u, v in zip(out, raw)]
        self.cnt += 1
        return out[0].float()


def reference_loop(pipe, forward, gen, y=None):
    """The reference's two-pass loop (independent of WanPipeline.sample), each DiT call through `forward`."""
    w, h = gen["size"]
    steps, guide = gen["sampling_steps"], gen["guide_scale"]
    noise = torch.randn(16, (gen["frame_num"] - 1) // 4 + 1, h // 8, w // 8,
                        generator=torch.Generator().manual_seed(gen["seed"]))
    seq_len = noise.shape[1] * noise.shape[2] * noise.shape[3] // 4
    ctx = [pipe.text_encoder([p], torch.device("cpu"))[0].float() for p in (PROMPT, NEG)]
    scheduler, timesteps = build_scheduler("unipc", steps, gen["shift"], "cpu", 1000)
    x = noise
    with torch.no_grad():
        for t in timesteps:
            high = t.item() >= pipe.boundary * 1000
            model, g = (pipe.high_noise_model, guide[1]) if high else (pipe.low_noise_model, guide[0])
            cond, uncond = (forward(model, x, t[None], c, seq_len) for c in ctx)
            x = scheduler.step((uncond + g * (cond - uncond))[None], t, x[None], return_dict=False)[0][0]
    return x


def ours(pipe, gen=GEN, **options):
    video, latent = pipe.generate(PROMPT, n_prompt=NEG, options=RuntimeOptions(**options), return_latents=True,
                                  **gen)
    return latent, pipe.last_result.cache


@pytest.fixture(scope="module")
def uncached_short(tiny_pipe):
    return ours(tiny_pipe, SHORT)[0]


# ---- data and schedules (no model) -----------------------------------------------------------------------------------
def test_published_ratios_are_the_facts_list_with_their_source():
    doc = json.loads((DATA / "magcache_t2v_A14B.json").read_text())
    assert doc["ratios"] == PUBLISHED_T2V and doc["branches"] == ["cond", "uncond"] and "Zehong-Ma/MagCache" in doc[
        "source"]
    assert doc["steps"] == 40 and doc["high_noise_steps"] == 26
    i2v = json.loads((DATA / "magcache_i2v_A14B.json").read_text())
    assert len(i2v["ratios"]) == 78 and i2v["ratios"][28] == 0.91076 and i2v["high_noise_steps"] == 15
    r = load_ratios(DATA / "magcache_t2v_A14B.json")
    assert r.per_step[0] == (1.0, 1.0) and r.per_step[26] == (0.65523, 0.65252) and len(r.per_step) == 40


# (thresh, K, retention): the facts file's table (section 1), 40 steps with 26 high-noise steps
TABLE_EQUAL = {
    (0.06, 2, 0.4): [10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 32, 34, 36],  # the README setting: 52 of 80 calls
    (0.04, 2, 0.2): [5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24, 29, 31, 33],  # argparse defaults: 46 / 80
    (0.06, 2, 0.2): [5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24, 29, 30, 32, 34, 36],  # 42 / 80
    (0.24, 6, 0.2): None,  # skips step 38 (facts file), checked against the replay
}


@pytest.mark.parametrize("setting", list(TABLE_EQUAL), ids=lambda s: "/".join(map(str, s)))
def test_magcache_schedule_equals_the_published_code(setting):
    thresh, k, rr = setting
    trace = trace_for(40)
    assert trace.count("high") == 26
    cond, uncond = replay(PUBLISHED_T2V, 40, 26, thresh, k, rr)
    mine = reused(magcache_schedule(load_ratios(DATA / "magcache_t2v_A14B.json").curve(40), trace, thresh, k, rr))
    assert cond == uncond == mine
    if TABLE_EQUAL[setting] is not None:
        assert mine == TABLE_EQUAL[setting]
    else:
        assert 38 in mine and 39 not in mine and 80 - 2 * len(mine) == 28


def test_magcache_differences_from_the_published_code_are_the_deliberate_ones():
    trace, curve = trace_for(40), load_ratios(DATA / "magcache_t2v_A14B.json").curve(40)
    # 0.12 / 3 / 0.2: the published code carries the accumulated error of step 25 into the low-noise phase (22 steps
    # skipped, 36 of 80 calls); we reset it at the switch. With that reset the published rule is ours exactly.
    pub = replay(PUBLISHED_T2V, 40, 26, 0.12, 3, 0.2)
    assert pub[0] == pub[1] and len(pub[0]) == 22
    mine = reused(magcache_schedule(curve, trace, 0.12, 3, 0.2))
    assert [s for s in mine if s < 26] == [s for s in pub[0] if s < 26] and mine != pub[0]
    assert replay(PUBLISHED_T2V, 40, 26, 0.12, 3, 0.2, reset_at_switch=True)[0] == mine
    # 0.06 / 2 / 0.1: int(52 x 0.1) = 5 calls is odd, so the published cond and uncond differ (37 of 80 calls); we
    # decide once per step for both branches, and only reuse a step the published code reuses in some branch.
    cond, uncond = replay(PUBLISHED_T2V, 40, 26, 0.06, 2, 0.1)
    assert cond != uncond and 80 - len(cond) - len(uncond) == 37
    mine = reused(magcache_schedule(curve, trace, 0.06, 2, 0.1))
    assert set(mine) <= set(cond) | set(uncond) and 80 - 2 * len(mine) == 36
    # the last step: computed even where the ratios would allow a reuse (published: reused)
    pub = replay(PUBLISHED_T2V, 40, 26, 1.0, 40, 0.2)
    assert 39 in pub[0] and magcache_schedule(curve, trace, 1.0, 40, 0.2)[39]


def test_magcache_i2v_schedule_computes_the_high_noise_phase_as_published():
    ratios = published_ratio_file("i2v")
    trace = trace_for(40, shift=5.0, boundary=900)
    assert trace.count("high") == 15
    curve = load_ratios(DATA / "magcache_i2v_A14B.json").curve(40)
    for rr in (0.2, 0.1):
        cond, uncond = replay(ratios, 40, 15, 0.06, 2, rr, mode="i2v")
        mine = reused(magcache_schedule(curve, trace, 0.06, 2, rr, uncached=("high",)))
        assert mine == cond and min(mine) >= 15
        assert (uncond == cond) == (rr == 0.2)  # rr 0.1: the published uncond also reuses step 17 (odd calls)


@pytest.mark.parametrize("steps", [20, 30, 50])
def test_other_step_counts_resample_the_ratios_nearest_as_published(steps):
    mag = published_mag_ratios(PUBLISHED_T2V, steps)
    curve = load_ratios(DATA / "magcache_t2v_A14B.json").curve(steps)
    assert curve == pytest.approx([(mag[2 * i] + mag[2 * i + 1]) / 2 for i in range(steps)], abs=1e-12)
    trace = trace_for(steps)
    schedule = magcache_schedule(curve, trace, 0.06, 2, 0.4)
    firsts = [i for i in range(steps) if i == 0 or trace[i] != trace[i - 1]]
    assert all(schedule[i] for i in firsts) and schedule[-1] and not all(schedule)


def test_ratio_files_round_trip(tmp_path):
    per_step = [PUBLISHED_T2V[i:i + 2] for i in range(0, 78, 2)]
    write_ratios(tmp_path / "r.json", per_step, ("cond", "uncond"), {"task": "t2v-A14B"})
    back = load_ratios(tmp_path / "r.json")
    assert back.per_step == load_ratios(DATA / "magcache_t2v_A14B.json").per_step
    assert json.loads((tmp_path / "r.json").read_text())["measured"] == {"task": "t2v-A14B"}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


# ---- the pipeline: off, never-skip and calibration are the uncached run bit for bit ----------------------------------
def test_off_never_skip_and_calibration_are_the_uncached_run_bit_for_bit(tiny_pipe, uncached_short, tmp_path):
    assert ours(tiny_pipe, SHORT, cache="none")[0].equal(uncached_short)
    assert tiny_pipe.last_result.cache is None and tiny_pipe.last_result.backends["step_cache"] == "off"
    for opts in (dict(cache="magcache", cache_max_skip=0), dict(cache="magcache", cache_thresh=0.0),
                 dict(cache="easycache", cache_thresh=0.0), dict(cache_calibrate=str(tmp_path / "r.json"))):
        latent, rec = ours(tiny_pipe, SHORT, **opts)
        assert torch.equal(latent, uncached_short), opts
        assert rec["computed_calls"] == rec["calls"] == 24 and rec["reused_steps"] == [], opts
    assert uncached_short.abs().mean() > 0.1


def test_magcache_matches_the_published_loop_and_nothing_crosses_the_switch(tiny_pipe):
    """40 steps at the README setting: the same reused steps as the published code, the same latent (1e-5), and
    every reused residual was made by the expert that reuses it."""
    made, used = {}, []
    models = {"high": tiny_pipe.high_noise_model, "low": tiny_pipe.low_noise_model}
    for name, m in models.items():
        def spy(x, t, context, seq_len, y=None, reuse=None, _orig=m.forward_residual, _name=name):
            out, r = _orig(x, t, context, seq_len, y=y, reuse=reuse)
            if reuse is None:
                made[id(r)] = _name
            else:  # looked up while the tensor is alive (ids of freed tensors are reused)
                used.append((_name, made[id(reuse)]))
            return out, r
        m.forward_residual = spy
    try:
        latent, rec = ours(tiny_pipe, cache="magcache")
    finally:
        for m in models.values():
            del m.forward_residual
    pub = PublishedMagCache(PUBLISHED_T2V, 40, 26, 0.06, 2, 0.4)
    want = reference_loop(tiny_pipe, pub.forward, GEN)
    assert rec["reused_steps"] == pub.skipped[0] == pub.skipped[1] == TABLE_EQUAL[(0.06, 2, 0.4)]
    assert rec["computed_calls"] == 52 and rec["calls"] == 80
    assert rel(latent, want) < 1e-5 and latent.abs().mean() > 0.1
    assert len(used) == 28 and all(user == maker for user, maker in used)
    assert {user for user, _ in used} == {"high", "low"}
    assert {rec["steps"][i]["cond"] for i in (10, 25, 32)} == {"reused"} and rec["steps"][26]["uncond"] == "computed"


def test_easycache_matches_the_published_rule_with_a_state_per_expert(tiny_pipe):
    """Data-dependent decisions: ours equal the published rule's when its state is renewed at the expert switch
    (decisions, latent within 1e-5); the published rule with its single state decides the same up to the switch."""
    gen = {**GEN, "sampling_steps": 20}  # 13 high-noise + 7 low-noise steps; the published warm-up of 7 steps
    switch = trace_for(20).index("low")
    latent, rec = ours(tiny_pipe, gen, cache="easycache", cache_thresh=0.5)
    ref = PublishedEasyCache(20, 0.5, 7, switch_step=switch)
    want = reference_loop(tiny_pipe, ref.forward, gen)
    mine = [s["cond"] == "computed" for s in rec["steps"]]
    assert mine == ref.computed and rel(latent, want) < 1e-5 and latent.abs().mean() > 0.1
    assert all(mine[:7]) and not all(mine[7:switch]) and not all(mine[switch:]) and mine[switch] and mine[-1]
    shared = PublishedEasyCache(20, 0.5, 7)
    reference_loop(tiny_pipe, shared.forward, gen)
    assert shared.computed[:switch] == mine[:switch]


def test_easycache_never_reuses_across_the_expert_switch(tiny_pipe):
    """With a huge threshold the published single state reuses the high-noise expert's update at the low-noise
    expert's first step; ours computes that step and the next (the rate is measured within the expert)."""
    gen, switch = SHORT, trace_for(12).index("low")
    latent, rec = ours(tiny_pipe, gen, cache="easycache", cache_thresh=10.0, cache_warmup=2)
    mine = [s["cond"] == "computed" for s in rec["steps"]]
    assert mine[switch] and mine[switch + 1] and not any(mine[2:switch]) and not any(mine[switch + 2:-1])
    shared = PublishedEasyCache(12, 10.0, 2)
    reference_loop(tiny_pipe, shared.forward, gen)
    assert not shared.computed[switch]  # the published code reuses across the switch
    renewed = PublishedEasyCache(12, 10.0, 2, switch_step=switch)
    want = reference_loop(tiny_pipe, renewed.forward, gen)
    assert renewed.computed == mine and rel(latent, want) < 1e-5


def test_each_generation_starts_clean_and_both_branches_share_one_decision(tiny_pipe, uncached_short):
    for opts in (dict(cache="magcache"), dict(cache="easycache", cache_thresh=1.0, cache_warmup=2)):
        a, rec_a = ours(tiny_pipe, SHORT, **opts)
        ours(tiny_pipe, {**SHORT, "seed": 99}, **opts)  # another video between them
        b, rec_b = ours(tiny_pipe, SHORT, **opts)
        assert torch.equal(a, b) and rec_a == rec_b and rec_a["reused_steps"], opts
        assert all(s["cond"] == s["uncond"] for s in rec_a["steps"])
        # one batch-2 forward per step: the same decisions (from the same ratios / the cond branch), both branches
        batched, rec = ours(tiny_pipe, SHORT, batched_cfg=True, **opts)
        assert all(s["cond"] == s["uncond"] for s in rec["steps"])
        if opts["cache"] == "magcache":
            assert rec["reused_steps"] == rec_a["reused_steps"] == [3, 4, 6, 7, 10]
            assert rel(batched, a) < 1e-4
    assert tiny_pipe.last_result.backends["step_cache"].startswith("easycache (thresh 1, warm-up 2 steps")


def test_few_step_runs_and_bad_settings_are_refused_before_anything_runs(tiny_pipe):
    calls = []
    enc = tiny_pipe.placement.encode
    tiny_pipe.placement.encode = lambda texts: calls.append(texts) or enc(texts)
    try:
        with pytest.raises(ValueError, match=f"at least {MIN_STEPS} sampling steps, this run has 4"):
            tiny_pipe.generate(PROMPT, options=RuntimeOptions(cache="magcache"), **{**GEN, "sampling_steps": 4})
        with pytest.raises(ValueError, match="does not exist"):
            tiny_pipe.generate(PROMPT, options=RuntimeOptions(cache="magcache", cache_ratios="/nope.json"), **GEN)
    finally:
        del tiny_pipe.placement.encode
    assert calls == []  # refused before T5
    for kw, needle in ((dict(cache_thresh=0.1), "add --cache magcache or --cache easycache"),
                       (dict(cache="easycache", cache_retention=0.2), "is a --cache magcache setting"),
                       (dict(cache="magcache", cache_warmup=3), "unused by --cache magcache"),
                       (dict(cache="magcache", cache_calibrate="x.json"), "drop --cache magcache"),
                       (dict(cache="magcache", cache_thresh=math.nan), "finite"),
                       (dict(cache="magcache", cache_retention=1.5), "from 0 to 1"),
                       (dict(cache="fastest"), "cache must be one of")):
        with pytest.raises(ValueError, match=needle):
            RuntimeOptions(**kw)


# ---- calibration -----------------------------------------------------------------------------------------------------
def test_calibration_measures_the_published_way_and_its_file_gives_the_schedule(tiny_pipe, tmp_path):
    """The ratios written are the published calibration's (mean over tokens of |r_t| / |r_t-1|, per branch, the
    residual kept across the switch); the file read back gives MagCache the schedule of that curve."""
    residuals = []
    models = (tiny_pipe.high_noise_model, tiny_pipe.low_noise_model)
    for m in models:
        def spy(*a, _orig=m.forward_residual, **k):
            out, r = _orig(*a, **k)
            residuals.append(r.clone())
            return out, r
        m.forward_residual = spy
    path = tmp_path / "mine.json"
    try:
        ours(tiny_pipe, SHORT, cache_calibrate=str(path))
    finally:
        for m in models:
            del m.forward_residual
    doc = json.loads(path.read_text())
    assert doc["branches"] == ["cond", "uncond"] and doc["steps"] == 12 and len(doc["ratios"]) == 22
    assert doc["measured"]["task"] == "t2v-tiny" and doc["measured"]["high_noise_steps"] == 8
    want = [(residuals[c].norm(dim=-1) / residuals[c - 2].norm(dim=-1)).mean().item() for c in range(2, 24)]
    assert doc["ratios"] == pytest.approx(want, abs=1e-6)
    latent, rec = ours(tiny_pipe, SHORT, cache="magcache", cache_ratios=str(path), cache_thresh=0.5,
                       cache_retention=0.2)
    curve = load_ratios(path).curve(12)
    assert rec["reused_steps"] == reused(magcache_schedule(curve, trace_for(12), 0.5, 2, 0.2))
    assert rec["settings"]["ratios"] == str(path)


# ---- image to video --------------------------------------------------------------------------------------------------
def test_i2v_off_is_the_uncached_run_and_magcache_follows_the_published_i2v_schedule(tiny_i2v_pipe):
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    gen = dict(max_area=64 * 64, frame_num=1, shift=5.0, sampling_steps=12, guide_scale=3.5, seed=5, n_prompt=NEG,
               return_latents=True)
    _, plain = tiny_i2v_pipe.generate(PROMPT, img, **gen)
    _, never = tiny_i2v_pipe.generate(PROMPT, img, options=RuntimeOptions(cache="magcache", cache_max_skip=0), **gen)
    assert torch.equal(never, plain) and plain.abs().mean() > 0.1
    _, cached = tiny_i2v_pipe.generate(PROMPT, img, options=RuntimeOptions(cache="magcache"),
                                       **{**gen, "sampling_steps": 40})
    rec = tiny_i2v_pipe.last_result.cache
    assert rec["reused_steps"] == [18, 19, 21, 22, 24, 25, 27, 29, 31, 33] and rec["computed_calls"] == 60
    assert tiny_i2v_pipe.last_result.expert_trace[:15] == ["high"] * 15


# ---- placements and compile ------------------------------------------------------------------------------------------
def test_block_streaming_streams_nothing_on_a_reused_step(tiny_ckpt):
    streamed = {}
    for opts in (dict(), dict(cache="magcache")):
        pipe = WanT2V(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, device="cpu", options=RuntimeOptions(stream_blocks=1))
        streamer = pipe.placement.streamer
        latent, rec = ours(pipe, SHORT, stream_blocks=1, **opts)
        streamed[opts.get("cache", "none")] = (latent, streamer.copies, rec)
    resident = ours(WanT2V(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, device="cpu"), SHORT, cache="magcache")[0]
    (_, plain_copies, _), (latent, copies, rec) = streamed["none"], streamed["magcache"]
    assert torch.equal(latent, resident)
    layers = WAN_CONFIGS["t2v-tiny"].arch.num_layers
    assert plain_copies - copies == (rec["calls"] - rec["computed_calls"]) * layers > 0  # one slot: every block


def test_compiled_blocks_never_recompile_with_the_cache(tiny_ckpt):
    from torch._dynamo.utils import counters

    counters.clear()
    pipe = WanT2V(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, device="cpu", options=RuntimeOptions(compile=True))
    eager = ours(WanT2V(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, device="cpu"), SHORT, cache="magcache")[0]
    first, rec = ours(pipe, SHORT, compile=True, cache="magcache")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and rec["reused_steps"] and rel(first, eager) < 1e-4
    with torch._dynamo.config.patch(error_on_recompile=True):
        again, _ = ours(pipe, {**SHORT, "seed": 4}, compile=True, cache="magcache")
        ours(pipe, SHORT, compile=True, cache="easycache", cache_thresh=1.0, cache_warmup=2)
    assert counters["stats"]["unique_graphs"] == graphs


# ---- the memory plan ------------------------------------------------------------------------------------------------
def test_memory_plan_counts_the_cache():
    from wan.memory_plan import estimate, plan_inputs
    from wan.options import fast_options

    cfg = WAN_CONFIGS["t2v-A14B"]
    plans = {c: estimate("resident", **plan_inputs(cfg, fast_options(cache=c), (1280, 720, 81), 11.4e9))
             for c in ("none", "magcache", "easycache")}
    # MagCache: one fp32 [75,600, 5120] residual per CFG branch (1.55 GB each) and the blocks' bf16 input, times the
    # plan's headroom
    assert plans["magcache"].phases["denoise"] - plans["none"].phases["denoise"] == pytest.approx(
        2 * 75600 * 5120 * (4 + 2) * 1.05 / 1e9, rel=1e-6)
    assert 0 < plans["easycache"].phases["denoise"] - plans["none"].phases["denoise"] < 0.2
    assert plans["magcache"].phases["decode"] == plans["none"].phases["decode"]  # freed before the decode
