"""Few-step mode through the real pipeline on the tiny checkpoint: LoRAs merged by the real loader (per tensor, fp32,
before any dtype cast), the Lightning Euler schedule with unrounded float timesteps, the 2+2 expert split, guidance
1 as one pass per step, and the public API scripts rely on (`high_noise_model.state_dict()` holds merged weights)."""
import pytest
import torch

from wan.configs import WAN_CONFIGS
from wan.configs.model_config import TINY
from wan.lora import LoraMerge, merge_lora_
from wan.testing.random_lora import random_lora_state_dict, write_random_lora_dir
from wan.text2video import WanT2V

FEW = dict(size=(64, 64), frame_num=5, shift=5.0, sample_solver="euler", sampling_steps=4, guide_scale=1.0, seed=3)
PROMPT = "a cat boxing on a stage under bright light"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return write_random_lora_dir(tmp_path_factory.mktemp("lora"), TINY, rank=4, seed=5)


def pipe(tiny_ckpt, **kw):
    return WanT2V(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, device="cpu", **kw)


@pytest.fixture(scope="module")
def plain(tiny_ckpt):
    return pipe(tiny_ckpt)


@pytest.fixture(scope="module")
def merged(tiny_ckpt, lora_dir):
    return pipe(tiny_ckpt, lora_dir=str(lora_dir))


def test_loader_merge_equals_the_formula(plain, merged, lora_dir):
    sd = random_lora_state_dict(TINY, rank=4, seed=5)  # the high-noise file's tensors
    base = plain.high_noise_model.state_dict()
    got = merged.high_noise_model.state_dict()  # the public expert module holds the merged weights
    name = "blocks.1.ffn.2"
    down, up = sd[f"diffusion_model.{name}.lora_down.weight"], sd[f"diffusion_model.{name}.lora_up.weight"]
    alpha = sd[f"diffusion_model.{name}.alpha"].item()
    want = base[f"{name}.weight"].double() + alpha / 4 * (up.double() @ down.double())
    torch.testing.assert_close(got[f"{name}.weight"].double(), want, rtol=1e-6, atol=1e-6)
    changed = [k for k in base if not torch.equal(base[k], got[k])]
    assert len(changed) == 2 * 10 and all(k.endswith(".weight") and ".norm" not in k for k in changed)
    low_w = merged.low_noise_model.blocks[0].ffn[0].weight
    assert not torch.equal(low_w, plain.low_noise_model.blocks[0].ffn[0].weight)
    assert merged.last_result is None and set(merged.backends()["loras"]) == {"high", "low"}


def test_loader_merge_equals_merging_a_loaded_model(tiny_ckpt, merged, lora_dir):
    other = pipe(tiny_ckpt)
    merge_lora_(other.low_noise_model, lora_dir / "low_noise_model.safetensors")
    for k, v in other.low_noise_model.state_dict().items():
        assert torch.equal(v, merged.low_noise_model.state_dict()[k]), k


def test_merge_happens_in_fp32_before_the_dtype_cast(tiny_ckpt, lora_dir):
    from wan.modules.model import WanModel

    lora = LoraMerge(lora_dir / "high_noise_model.safetensors")
    fp32 = WanModel.from_pretrained(tiny_ckpt, "high_noise_model", None, "cpu", transform=lora)
    bf16 = WanModel.from_pretrained(tiny_ckpt, "high_noise_model", torch.bfloat16, "cpu",
                                    transform=LoraMerge(lora_dir / "high_noise_model.safetensors"))
    for k, v in fp32.state_dict().items():
        assert torch.equal(bf16.state_dict()[k], v.to(torch.bfloat16)), k  # one rounding, after the merge


def test_zero_strength_and_zero_up_give_the_plain_video(tiny_ckpt, plain, lora_dir, tmp_path):
    from safetensors.torch import save_file

    ref = plain.generate(PROMPT, **FEW)
    zero = pipe(tiny_ckpt, lora_dir=str(lora_dir), lora_strength=0.0).generate(PROMPT, **FEW)
    assert torch.equal(zero, ref)
    sd = random_lora_state_dict(TINY, rank=4, seed=5)
    sd = {k: torch.zeros_like(v) if "lora_up" in k else v for k, v in sd.items()}
    save_file(sd, tmp_path / "zero_up.safetensors")
    zero_up = pipe(tiny_ckpt, lora_high=tmp_path / "zero_up.safetensors", lora_low=tmp_path / "zero_up.safetensors")
    assert torch.equal(zero_up.generate(PROMPT, **FEW), ref)


def test_euler_schedule_float_timesteps_and_two_plus_two_split(merged):
    seen = []
    models = (merged.high_noise_model, merged.low_noise_model)
    origs = [m.forward for m in models]

    def spy(orig, name):
        def f(x, t, context, seq_len, y=None):
            seen.append((name, t.dtype, t.tolist()))
            return orig(x, t, context, seq_len)
        return f

    for m, o, n in zip(models, origs, ("high", "low")):
        m.forward = spy(o, n)
    try:
        video, latent = merged.generate(PROMPT, return_latents=True, **FEW)
    finally:
        for m in models:
            del m.forward
    res = merged.last_result
    assert res.expert_trace == ["high", "high", "low", "low"] and res.solver == "euler"
    assert [s[0] for s in seen] == ["high", "high", "low", "low"]  # one forward per step at guidance 1
    assert all(s[1] == torch.float32 for s in seen)  # unrounded float32 timesteps
    assert [s[2][0] for s in seen] == [1000.0, 937.5, pytest.approx(833.3333129882812, abs=0), 625.0]
    assert res.backends["guidance"] == {"low": "one conditional pass (guidance 1)",
                                        "high": "one conditional pass (guidance 1)"}
    assert video.shape == (3, 5, 64, 64) and torch.isfinite(latent).all()


def test_missing_lora_file_is_named(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="noise_model.safetensors"):
        pipe(tiny_ckpt, lora_dir=str(tmp_path))
