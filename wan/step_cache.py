"""Step caching: on some denoising steps, reuse what the DiT computed at an earlier step instead of running its
blocks. An approximation, opt-in per call (`options.cache`), never part of --fast, its error measured beside its
speed (README "Step caching").

One policy object per generation (`choose_step_cache`, called by `WanPipeline.sample`) holds every piece of state,
per expert and per CFG branch; the loop asks it for each step's model (`model_for_step`) and hands that to the
guidance strategy, so neither guidance nor the DiT's forward knows about caching. With the cache off there is no
policy at all: the loop and the forward are the original ones.

- `MagCache` (arXiv 2506.09045): reuses the block stack's residual r = blocks(x) - x of each branch. Its schedule
  depends only on a magnitude-ratio curve (published for T2V-A14B and I2V-A14B: wan/configs/magcache_*.json, or
  measured with `MagCalibration`: required for TI2V-5B, which has no published curve) and the settings, so it is
  known, logged and recorded before the first step and needs no host sync. A reused call runs the embeddings, x + r
  and the head (`WanModel.forward_residual`): no block, so nothing is streamed (block streaming) and nothing compiled
  is touched (compile).
- `EasyCache` (arXiv 2507.02860): reuses the whole model's update (the transformation v - x of each branch; a
  reused call runs no model op), deciding from the transformation rate measured between the last two computed
  steps. Adaptive: one host sync per step it decides.
- `MagCalibration` (--cache_calibrate): a normal run (every call computed: the uncached result, bit for bit) that
  measures the ratio curve on the user's own weights, LoRAs, size and step count and writes it for --cache_ratios.

Where this deliberately differs from the published code (each difference tested against a faithful
re-implementation in tests/test_step_cache.py):
- one decision per step for every CFG branch (the batch-2 forward, two passes, CFG parallel): MagCache decides on the
  mean of its cond and uncond curves, EasyCache on the cond branch (as published);
- state per expert: the first step of each expert is computed and no residual, error or rate crosses the expert
  switch (both published codes keep one state across the two experts); a one-model task (TI2V-5B, trace "model"
  throughout) is one segment with one state;
- the last step is always computed (EasyCache publishes it; MagCache's ratios make it so only at moderate settings);
- a fresh policy per generation (the published codes keep their counters from one video to the next);
- MagCache's retention counts steps per expert: round(retention x the expert's steps), at least one, are computed at
  its start (published: counted in calls, `<` for the first phase and `<=` for the second).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("wan")

CACHES = ("none", "magcache", "easycache")
MIN_STEPS = 10  # below this the published evidence shows no speedup or broken videos (few-step / distilled runs)
RATIOS_FORMAT = "wan22-magcache-ratios"
DATA = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class MagSettings:
    """MagCache's published settings for a task kind."""
    ratios: str  # file in wan/configs
    thresh: float
    max_skip: int
    retention: float
    uncached: tuple[str, ...] = ()  # experts computed at every step (published I2V: the high-noise one)


@dataclass(frozen=True)
class EasySettings:
    thresh: float
    warmup: int


# Zehong-Ma/MagCache, MagCache4Wan2.2 README: T2V-A14B "E006K2R04", I2V-A14B thresh 0.06, K 2, retention 0.1 with
# the i2v mode (the whole high-noise phase computed). TI2V-5B (one model): no curve of ours to ship, so its magcache
# needs --cache_ratios FILE (measured with --cache_calibrate); the other settings default to T2V-A14B's (text and
# image mode alike: the image only fixes the first latent frame), not tuned for the 5B model.
MAGCACHE = {"t2v": MagSettings("magcache_t2v_A14B.json", 0.06, 2, 0.4),
            "i2v": MagSettings("magcache_i2v_A14B.json", 0.06, 2, 0.1, uncached=("high",)),
            "ti2v": MagSettings("", 0.06, 2, 0.4)}
# H-EmbodVis/EasyCache, EasyCache4Wan2.2/easycache_generate.py (3d4ba21): --thresh_t2v 0.06, --thresh_i2v 0.05,
# --ret_steps 7. TI2V-5B: the T2V setting (not published for it).
EASYCACHE = {"t2v": EasySettings(0.06, 7), "i2v": EasySettings(0.05, 7), "ti2v": EasySettings(0.06, 7)}


def task_kind(task) -> str:
    """The settings' key: a model type ("t2v", "i2v", "ti2v": TaskConfig.arch.model_type), or the older boolean
    takes_image (True: i2v, False: t2v)."""
    if isinstance(task, str):
        if task not in MAGCACHE:
            raise ValueError(f"no step-cache settings for task kind {task!r}; one of {', '.join(MAGCACHE)}")
        return task
    return "i2v" if task else "t2v"


# ---- options: checks and the resolved settings --------------------------------------------------------------------
def check_cache_options(opts) -> None:
    """RuntimeOptions' cache fields, each alone and together (no file is read here); one-line ValueErrors."""
    if opts.cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {opts.cache!r}")
    bounds = {"cache_thresh": (0.0, 10.0), "cache_retention": (0.0, 1.0)}
    for name, (lo, hi) in bounds.items():
        v = getattr(opts, name)
        if v is not None and not (math.isfinite(v) and lo <= v <= hi):
            raise ValueError(f"--{name} must be a finite number from {lo:g} to {hi:g}, got {v}")
    for name in ("cache_max_skip", "cache_warmup"):
        v = getattr(opts, name)
        if v is not None and not 0 <= v <= 1000:
            raise ValueError(f"--{name} must be a whole number of steps from 0 to 1000, got {v}")
    for name in ("cache_ratios", "cache_calibrate"):
        if getattr(opts, name) is not None and not str(getattr(opts, name)).strip():
            raise ValueError(f"--{name} needs a file name")
    settings = [n for n in ("cache_thresh", "cache_max_skip", "cache_retention", "cache_warmup", "cache_ratios")
                if getattr(opts, n) is not None]
    if opts.cache_calibrate is not None and opts.cache != "none":
        raise ValueError("--cache_calibrate is a normal run that measures the ratios (nothing is reused); drop "
                         f"--cache {opts.cache}, then use the file with --cache magcache --cache_ratios FILE")
    if opts.cache == "none" and settings:
        raise ValueError(f"--{settings[0]} is a step-cache setting; add --cache magcache or --cache easycache "
                         "(or drop it)")
    only = {"cache_retention": "magcache", "cache_ratios": "magcache", "cache_warmup": "easycache"}
    for name in settings:
        if only.get(name, opts.cache) != opts.cache:
            own = {"magcache": "--cache_retention", "easycache": "--cache_warmup"}[opts.cache]
            raise ValueError(f"--{name} is a --cache {only[name]} setting, unused by --cache {opts.cache} (whose "
                             f"warm-up is {own}); drop it or use --cache {only[name]}")


@dataclass(frozen=True)
class CacheSettings:
    """What one call's cache runs with: the options' values, else the published ones for the task kind."""
    method: str  # magcache, easycache or calibrate
    thresh: float = 0.0
    max_skip: int | None = None
    retention: float = 0.0
    warmup: int = 0
    uncached: tuple[str, ...] = ()
    ratios: Path | None = None  # magcache: the curve's file
    calibrate: Path | None = None

    def describe(self) -> str:
        if self.method == "calibrate":
            return f"calibration run (nothing reused), ratios to {self.calibrate}"
        skip = "no limit" if self.max_skip is None else str(self.max_skip)
        if self.method == "magcache":
            also = f", {'/'.join(self.uncached)}-noise expert computed every step" if self.uncached else ""
            return (f"magcache (thresh {self.thresh:g}, max skip {skip}, retention {self.retention:g}{also}; ratios "
                    f"{self.ratios.name})")
        return f"easycache (thresh {self.thresh:g}, warm-up {self.warmup} steps, max skip {skip})"

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def resolve(opts, task) -> CacheSettings | None:
    """The call's cache settings (None: the cache is off and nothing is calibrated). `task`: the model type (see
    `task_kind`). A task without a published ratio curve (ti2v) needs opts.cache_ratios for magcache: a one-line
    ValueError otherwise."""
    kind = task_kind(task)
    if opts.cache_calibrate is not None:
        return CacheSettings("calibrate", calibrate=Path(opts.cache_calibrate))
    if opts.cache == "magcache":
        pub = MAGCACHE[kind]
        if not pub.ratios and not opts.cache_ratios:
            raise ValueError(f"--cache magcache needs --cache_ratios FILE for {kind}: MagCache's published ratio "
                             "curves are for T2V-A14B and I2V-A14B only; measure this model's once with "
                             "--cache_calibrate FILE (a normal run), or use --cache easycache")
        return CacheSettings("magcache", _given(opts.cache_thresh, pub.thresh), _given(opts.cache_max_skip,
                             pub.max_skip), _given(opts.cache_retention, pub.retention), uncached=pub.uncached,
                             ratios=Path(opts.cache_ratios) if opts.cache_ratios else DATA / pub.ratios)
    if opts.cache == "easycache":
        pub = EASYCACHE[kind]
        return CacheSettings("easycache", _given(opts.cache_thresh, pub.thresh), opts.cache_max_skip,
                             warmup=_given(opts.cache_warmup, pub.warmup))
    return None


def _given(value, default):
    return default if value is None else value


def check_cache_request(opts, steps: int, task) -> CacheSettings | None:
    """Before anything runs: the step count (few-step runs are refused) and the ratio file (read and checked; a
    task without published ratios needs one). `task`: the model type (see `task_kind`). Returns the resolved
    settings (None when off)."""
    settings = resolve(opts, task)
    if settings is None:
        return None
    if steps < MIN_STEPS:
        what = "--cache_calibrate" if settings.method == "calibrate" else f"--cache {settings.method}"
        raise ValueError(f"{what} needs at least {MIN_STEPS} sampling steps, this run has {steps}: step caching "
                         "gives no speedup or breaks the video on few-step (distilled) runs; drop it")
    if settings.ratios is not None:
        load_ratios(settings.ratios)
    return settings


# ---- magnitude ratios: the published curves and calibrated ones ---------------------------------------------------
@dataclass(frozen=True)
class MagRatios:
    """One ratio per step and branch: per_step[i][b] = mean over tokens of |r_i| / |r_(i-1)| (step 0: 1.0)."""
    branches: tuple[str, ...]
    per_step: tuple[tuple[float, ...], ...]
    source: str

    def curve(self, steps: int) -> list[float]:
        """The per-step curve for `steps` steps: each branch resampled to the step count by nearest index (as the
        published code), then the branches' mean (one decision per step for all branches)."""
        n = len(self.per_step)
        if steps == n:
            idx = list(range(n))
        elif steps == 1:
            idx = [n - 1]
        else:  # the published nearest_interp: round(i * scale), Python's round = numpy's (half to even)
            scale = (n - 1) / (steps - 1)
            idx = [int(round(i * scale)) for i in range(steps)]
        return [sum(self.per_step[i]) / len(self.branches) for i in idx]


def load_ratios(path) -> MagRatios:
    """A ratio file (the published ones in wan/configs, or one --cache_calibrate wrote), checked; one-line
    ValueError naming the file and what is wrong."""
    path = Path(path)
    where = f"--cache_ratios {path}"
    if not path.is_file():
        raise ValueError(f"{where} {'is not a file' if path.exists() else 'does not exist'}; write one with "
                         "--cache_calibrate FILE")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where} is not a JSON file ({exc.__class__.__name__}); write one with --cache_calibrate "
                         "FILE") from None
    if not isinstance(doc, dict) or doc.get("format") != RATIOS_FORMAT:
        raise ValueError(f"{where} is not a ratio file (no \"format\": \"{RATIOS_FORMAT}\"); write one with "
                         "--cache_calibrate FILE")
    branches, ratios = doc.get("branches"), doc.get("ratios")
    if branches not in (["cond", "uncond"], ["cond"]):
        raise ValueError(f"{where}: \"branches\" must be [\"cond\", \"uncond\"] or [\"cond\"], got {branches!r}")
    if (not isinstance(ratios, list) or not ratios or len(ratios) % len(branches)
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0
                       for r in ratios)):
        raise ValueError(f"{where}: \"ratios\" must be a non-empty list of positive finite numbers, "
                         f"{len(branches)} per step (steps 1..N-1)")
    b = len(branches)
    per_step = [(1.0,) * b] + [tuple(float(r) for r in ratios[i:i + b]) for i in range(0, len(ratios), b)]
    return MagRatios(tuple(branches), tuple(per_step), str(doc.get("source", path.name)))


def write_ratios(path, per_step: list[list[float]], branches: tuple[str, ...], measured: dict) -> None:
    """Write a ratio file atomically: per_step[i] (steps 1..N-1) holds one ratio per branch."""
    path = Path(path)
    doc = {"format": RATIOS_FORMAT, "version": 1,
           "description": "MagCache magnitude ratios measured by --cache_calibrate: for each step 1..N-1 the mean "
                          "over tokens of |r_t| / |r_t-1| (r = the block stack's output minus its input), per CFG "
                          "branch",
           "source": f"--cache_calibrate {path.name}", "branches": list(branches),
           "layout": "interleaved per step: " + ", ".join(branches) + " for steps 1..N-1 (step 0 has no ratio)",
           "steps": len(per_step) + 1, "measured": measured,
           "ratios": [round(float(v), 6) for step in per_step for v in step]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(format_ratio_file(doc))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_ratio_file(doc: dict) -> str:
    """JSON with one step's ratios per line (readable next to the published list)."""
    head = json.dumps({k: v for k, v in doc.items() if k != "ratios"}, indent=1)[:-2]
    b = len(doc["branches"])
    rows = [", ".join(repr(v) for v in doc["ratios"][i:i + b]) for i in range(0, len(doc["ratios"]), b)]
    return head + ',\n "ratios": [\n  ' + ",\n  ".join(rows) + "\n ]\n}\n"


# ---- the MagCache schedule ----------------------------------------------------------------------------------------
def magcache_schedule(curve: list[float], trace: list[str], thresh: float, max_skip: int, retention: float,
                      uncached: tuple[str, ...] = ()) -> list[bool]:
    """Compute (True) or reuse (False) per step. Per expert segment of `trace`: its first round(retention x
    length) steps (at least one) are computed; then the published rule: ratio *= curve[i], skips += 1,
    err += |1 - ratio|; reuse while err < thresh and skips <= max_skip, else compute and reset (1, 0, 0). Experts in
    `uncached` and the last step are always computed."""
    n = len(trace)
    compute = [True] * n
    start = 0
    while start < n:
        end = start
        while end < n and trace[end] == trace[start]:
            end += 1
        if trace[start] not in uncached:
            forced = max(1, math.floor((end - start) * retention + 0.5))
            ratio, skips, err = 1.0, 0, 0.0
            for i in range(start + forced, min(end, n - 1)):
                ratio, skips = ratio * curve[i], skips + 1
                err += abs(1.0 - ratio)
                if err < thresh and skips <= max_skip:
                    compute[i] = False
                else:
                    ratio, skips, err = 1.0, 0, 0.0
        start = end
    return compute


def _ranges(steps: list[int]) -> str:
    """[10, 11, 13, 14, 15] -> '10-11, 13-15'."""
    out, run = [], []
    for s in steps:
        if run and s != run[-1] + 1:
            out.append(run)
            run = []
        run.append(s)
    if run:
        out.append(run)
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in out) or "none"


# ---- the policies -------------------------------------------------------------------------------------------------
class _Policy:
    """Bookkeeping shared by the policies: the expert trace of the whole schedule, what each step did, the report."""

    method = "?"

    def __init__(self, settings: CacheSettings, trace: list[str], guidance: dict):
        self.settings, self.trace, self.guidance = settings, list(trace), guidance
        self.n = len(trace)
        self.computed: list[bool | None] = [None] * self.n
        # the CFG branches of each expert's steps, over all ranks (guidance 1: the conditional one only)
        self.cfg_branches = {e: ("cond", "uncond") if g.needs_negative else ("cond",) for e, g in guidance.items()}

    def _mark(self, i: int, compute: bool) -> bool:
        self.computed[i] = compute
        return compute

    def report(self) -> dict:
        """What ran, per step and branch ("computed" / "reused"), and the totals (DiT calls = steps x branches)."""
        ran = [(i, c) for i, c in enumerate(self.computed) if c is not None]
        width = [len(self.cfg_branches[self.trace[i]]) for i, _ in ran]
        return {"method": self.settings.method, "settings": self.settings.as_dict(),
                "calls": sum(width), "computed_calls": sum(w for w, (_, c) in zip(width, ran) if c),
                "reused_steps": [i for i, c in ran if not c],
                "steps": [{"step": i, "expert": self.trace[i],
                           **{br: "computed" if c else "reused" for br in self.cfg_branches[self.trace[i]]}}
                          for i, c in ran]}

    def calls(self, steps) -> int:
        """DiT calls (steps x CFG branches) of these steps."""
        return sum(len(self.cfg_branches[self.trace[i]]) for i in steps)

    def finish(self, result) -> None:
        """After the loop: drop the cached tensors (before the VAE decode), record and log what ran."""
        rep = self.report()
        if result is not None:
            result.cache = rep
        log.info("step cache %s: computed %d of %d DiT calls; reused steps: %s", self.settings.method,
                 rep["computed_calls"], rep["calls"], _ranges(rep["reused_steps"]))


class MagCache(_Policy):
    """MagCache for one generation: the schedule fixed up front, one residual per branch of the running expert."""

    method = "magcache"

    def __init__(self, settings: CacheSettings, trace: list[str], guidance: dict,
                 schedule: list[bool] | None = None):
        """`schedule` (compute / reuse per step) overrides the ratio rule: for benchmarks that time a reused call."""
        super().__init__(settings, trace, guidance)
        if schedule is None:
            self.ratios = load_ratios(settings.ratios)
            curve = self.ratios.curve(self.n)
            schedule = magcache_schedule(curve, self.trace, settings.thresh, settings.max_skip, settings.retention,
                                         settings.uncached)
        self.schedule = list(schedule)
        if len(self.schedule) != self.n or not all(self.schedule[i] for i in _first_steps(self.trace)):
            raise ValueError("a MagCache schedule needs one entry per step and a compute at each expert's first step")
        self.residuals: dict[int, torch.Tensor] = {}  # call index in the step -> r of the running expert
        self.expert = None
        reused = [i for i, c in enumerate(self.schedule) if not c]
        log.info("step cache: %s, %d steps: computing %d of %d DiT calls (steps x CFG branches); reusing steps %s",
                 settings.describe(), self.n, self.calls(range(self.n)) - self.calls(reused),
                 self.calls(range(self.n)), _ranges(reused))

    def model_for_step(self, i: int, expert: str, model, latent):
        if expert != self.expert:  # the expert's first step (computed): nothing of the other expert is kept
            self.residuals.clear()
            self.expert = expert
        if expert in self.settings.uncached:  # computed at every step (published I2V: high-noise): the plain DiT
            self._mark(i, True)
            return model
        return _ResidualStep(self.residuals, model, self._mark(i, self.schedule[i]))

    def finish(self, result) -> None:
        self.residuals.clear()
        super().finish(result)
        if result is not None:
            result.cache["planned_reused_steps"] = [i for i, c in enumerate(self.schedule) if not c]


class _ResidualStep:
    """The DiT for one step under MagCache: the k-th call of the step (a CFG pass) computes and keeps its residual
    r_k, or reuses it."""

    def __init__(self, residuals: dict, model, compute: bool):
        self.residuals, self.model, self.compute, self.calls = residuals, model, compute, 0

    def __call__(self, x, t, context, seq_len, y=None):
        k, self.calls = self.calls, self.calls + 1
        if not self.compute:
            return self.model.forward_residual(x, t, context, seq_len, y=y, reuse=self.residuals[k])[0]
        self.residuals.pop(k, None)  # freed before the new one exists: one residual per branch at the peak
        out, self.residuals[k] = self.model.forward_residual(x, t, context, seq_len, y=y)
        return out


class _EasyState:
    """One expert's EasyCache state."""

    def __init__(self):
        self.err = 0.0  # accumulated predicted error (a 0-d device tensor once a rate exists)
        self.rate = None  # k = mean|v_i - v_j| / mean|x_i - x_j| between the last two computed steps
        self.prev_input = None  # x of the previous step (computed or not)
        self.last_input = self.last_output = self.out_norm = None  # x, v and mean|v| of the last computed step
        self.deltas: dict[int, list] = {}  # call index -> [v - x] per sample
        self.skips = 0


class EasyCache(_Policy):
    """EasyCache for one generation: decisions from the cond branch (as published), one per step, state per
    expert. Under several ranks the cond-holding ranks' decision is shared with one all-reduce (CFG parallel: the
    uncond half does not see the cond output)."""

    method = "easycache"

    def __init__(self, settings: CacheSettings, trace: list[str], guidance: dict, device):
        super().__init__(settings, trace, guidance)
        self.device = torch.device(device)
        self.first = _first_steps(self.trace)
        self.state: _EasyState | None = None
        forced = sorted({i for i in range(min(settings.warmup, self.n))} | self.first | {self.n - 1})
        log.info("step cache: %s, %d steps: adaptive (decided from the transformation rate as the steps run); "
                 "always computed: steps %s (warm-up, each expert's first step, the last step)", settings.describe(),
                 self.n, _ranges(forced))

    def model_for_step(self, i: int, expert: str, model, latent):
        if i in self.first:  # nothing of the other expert: its rate, error and updates stay behind
            self.state = _EasyState()
        st = self.state
        if i < self.settings.warmup or i in self.first or i == self.n - 1:
            st.err, compute = 0.0, True
        else:
            holds_cond = any("cond" in call for call in self.guidance[expert].branches)
            compute = self._agree(self._wants_compute(st, latent) if holds_cond else False)
        st.prev_input = latent
        st.skips = 0 if compute else st.skips + 1
        return _OutputStep(self, st, model, self._mark(i, compute), self.guidance[expert].branches)

    def _wants_compute(self, st: _EasyState, latent) -> bool:
        if st.rate is None or st.prev_input is None:  # no rate yet (the expert's second step)
            return True
        if self.settings.max_skip is not None and st.skips >= self.settings.max_skip:
            st.err = 0.0
            return True
        change = (latent - st.prev_input).abs().mean()
        st.err = st.err + st.rate * (change / st.out_norm)
        if bool(st.err < self.settings.thresh):  # the host sync of an adaptive cache
            return False
        st.err = 0.0
        return True

    def _agree(self, want: bool) -> bool:
        """The same decision on every rank: the cond-holding ranks' (they agree: they hold the same bytes)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return want
        flag = torch.tensor([1.0 if want else 0.0], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def observe(self, st: _EasyState, x: torch.Tensor, v: torch.Tensor) -> None:
        """A computed cond pass: the rate between it and the previous computed step, then it becomes the last."""
        if st.last_output is not None and st.last_input is not None:
            st.rate = (v - st.last_output).abs().mean() / (x - st.last_input).abs().mean()
        st.last_input, st.last_output, st.out_norm = x, v, v.abs().mean()

    def finish(self, result) -> None:
        self.state = None
        super().finish(result)


class _OutputStep:
    """The DiT for one step under EasyCache: a computed call keeps v - x per sample; a reused call returns x + that,
    running nothing of the model."""

    def __init__(self, owner: EasyCache, state: _EasyState, model, compute: bool, branches):
        self.owner, self.state, self.model, self.compute, self.branches = owner, state, model, compute, branches
        self.calls = 0

    def __call__(self, x, t, context, seq_len, y=None):
        k, self.calls = self.calls, self.calls + 1
        if not self.compute:
            return [u + d for u, d in zip(x, self.state.deltas[k])]
        out = self.model(x, t, context, seq_len, y=y)
        self.state.deltas[k] = [v - u for v, u in zip(out, x)]
        if "cond" in self.branches[k]:
            j = self.branches[k].index("cond")
            self.owner.observe(self.state, x[j], out[j])
        return out


class MagCalibration(_Policy):
    """--cache_calibrate: every call computed (the uncached result) through `forward_residual`; per step and branch
    the mean over tokens of |r_t| / |r_(t-1)|, kept on the device (no sync in the loop), written at the end. The
    previous residual is kept across the expert switch, as the published calibration does (its curve holds the
    switch's ratio; the caches never use it: each expert's first step is computed)."""

    method = "calibrate"

    def __init__(self, settings: CacheSettings, trace: list[str], guidance: dict, seq_len: int, measured: dict,
                 sp_group=None, cfg_group=None, rank: int = 0):
        super().__init__(settings, trace, guidance)
        self.seq_len, self.measured, self.rank = seq_len, measured, rank
        self.sp_group, self.cfg_group = sp_group, cfg_group
        self.prev: dict[int, torch.Tensor] = {}
        self.sums: dict[int, list[torch.Tensor]] = {}  # step -> per call: [B] sums over this rank's tokens
        log.info("step cache: %s, %d steps: every call computed", settings.describe(), self.n)

    def model_for_step(self, i: int, expert: str, model, latent):
        self._mark(i, True)
        return _CalibrationStep(self, i, model)

    def observe(self, i: int, k: int, r: torch.Tensor) -> None:
        if k in self.prev:
            per_token = r.norm(dim=-1) / self.prev[k].norm(dim=-1)  # [B, L(/P)]
            self.sums.setdefault(i, []).append(per_token.float().sum(dim=1))
        self.prev[k] = r

    def finish(self, result) -> None:
        import torch.distributed as dist

        self.prev.clear()
        steps = sorted(self.sums)
        rows = [torch.cat(self.sums[i]) for i in steps]
        branches = self.cfg_branches[self.trace[0]]
        if len({len(r) for r in rows}) > 1:  # guidance 1 on one expert only: the branch every step has (cond)
            rows, branches = [r[:1] for r in rows], ("cond",)
        local = torch.stack(rows) if rows else torch.zeros(0, len(branches))
        if self.sp_group is not None:  # the tokens of every rank of the SP group
            dist.all_reduce(local, group=self.sp_group)
        local = local.double() / self.seq_len
        if self.cfg_group is not None:  # cond on cfg rank 0, uncond on cfg rank 1
            both = [torch.empty_like(local) for _ in range(2)]
            dist.all_gather(both, local.contiguous(), group=self.cfg_group)
            local = torch.cat(both, dim=1)
        super().finish(result)
        if result is not None:
            result.cache["calibrated"] = str(self.settings.calibrate)
        if self.rank == 0:
            write_ratios(self.settings.calibrate, local.cpu().tolist(), branches, self.measured)
            log.info("wrote %d magcache ratios per branch (%s) to %s; use them with --cache magcache --cache_ratios "
                     "%s", len(steps), ", ".join(branches), self.settings.calibrate, self.settings.calibrate)


class _CalibrationStep:
    def __init__(self, owner: MagCalibration, i: int, model):
        self.owner, self.i, self.model, self.calls = owner, i, model, 0

    def __call__(self, x, t, context, seq_len, y=None):
        k, self.calls = self.calls, self.calls + 1
        out, r = self.model.forward_residual(x, t, context, seq_len, y=y)
        self.owner.observe(self.i, k, r)
        return out


def _first_steps(trace: list[str]) -> set[int]:
    """The first step of each expert segment."""
    return {i for i in range(len(trace)) if i == 0 or trace[i] != trace[i - 1]}


def choose_step_cache(opts, task, trace: list[str], guidance: dict, *, device, seq_len: int = 0,
                      measured: dict | None = None, sp_group=None, cfg_group=None, rank: int = 0):
    """The policy for one generation over the whole schedule `trace` (the DiT name per step: "high" / "low", or
    "model" throughout for a one-model task, one segment), or None: the cache is off and nothing is calibrated, so
    the loop runs the original forward. `task`: the model type (see `task_kind`)."""
    settings = check_cache_request(opts, len(trace), task)
    if settings is None:
        return None
    if settings.method == "magcache":
        return MagCache(settings, trace, guidance)
    if settings.method == "easycache":
        return EasyCache(settings, trace, guidance, device)
    return MagCalibration(settings, trace, guidance, seq_len, measured or {}, sp_group, cfg_group, rank)
