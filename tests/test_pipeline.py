"""End-to-end tiny pipeline: seeded determinism, expert choice per step, input checks (its pinned numbers:
test_pinned_values.py)."""
import pytest
import torch

from wan.testing.pinned_stages import GEN, PROMPT  # the pinned run's prompt and settings (test_pinned_values.py)


def test_same_seed_same_video_other_seed_differs(tiny_pipe):
    a = tiny_pipe.generate(PROMPT, seed=5, **GEN)
    b = tiny_pipe.generate(PROMPT, seed=5, **GEN)
    c = tiny_pipe.generate(PROMPT, seed=6, **GEN)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-2


def test_expert_choice_per_step_40_steps(tiny_pipe):
    tiny_pipe.generate(PROMPT, seed=1, **{**GEN, "sampling_steps": 40, "size": (64, 64), "frame_num": 1})
    assert tiny_pipe.last_result.expert_trace == ["high"] * 26 + ["low"] * 14


def test_generate_rejects_bad_input(tiny_pipe):
    with pytest.raises(ValueError, match="4n\\+1"):
        tiny_pipe.generate(PROMPT, seed=1, **{**GEN, "frame_num": 8})
    with pytest.raises(ValueError, match="prompt is empty"):
        tiny_pipe.generate("  ", seed=1, **GEN)


def test_prompt_over_text_len_is_truncated_with_warning(tiny_pipe, caplog):
    long_prompt = " ".join(["a cat boxing on a stage under bright light"] * 80)
    with caplog.at_level("WARNING", logger="wan"):
        ctx = tiny_pipe.text_encoder([long_prompt], torch.device("cpu"))
    assert ctx[0].shape[0] == 512
    assert any("truncated" in r.message for r in caplog.records)


def test_temporary_copy_restores_host_tensors():
    from wan.placement import temporary_copy

    lin = torch.nn.Linear(3, 2)
    ptr, before = lin.weight.data_ptr(), lin.weight.detach().clone()
    with temporary_copy(lin, torch.device("cpu")) as m:
        assert m.weight.data_ptr() != ptr and torch.equal(m.weight, before)
        m.weight.data.add_(1)  # a copy: the host tensor is untouched
    assert lin.weight.data_ptr() == ptr and torch.equal(lin.weight, before)
