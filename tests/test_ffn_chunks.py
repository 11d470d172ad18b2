"""Token-chunked FFN (wan/modules/ffn.py): the same rows as the whole FFN, in the block and the whole model."""
import pytest
import torch
import torch.nn as nn

from wan.modules.ffn import TokenChunkedFFN, WholeFFN, ffn_runner


def _ffn(d=48, f=96, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, f), nn.GELU(approximate="tanh"), nn.Linear(f, d)).to(dtype)


@pytest.mark.parametrize("chunks,align,tokens,calls", [(2, 8, 64, 2), (3, 8, 64, 3), (4, 1, 7, 4), (8, 1, 5, 5),
                                                       (4, 256, 600, 3), (2, 256, 100, 1)])
def test_chunked_equals_whole(chunks, align, tokens, calls):
    ffn = _ffn()
    seen = []
    ffn.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    x = torch.randn(2, tokens, 48)
    whole = WholeFFN()(ffn, x)
    seen.clear()
    y = TokenChunkedFFN(chunks, align)(ffn, x)
    # each token's row is computed alone; only a GEMM's summation order may differ with M
    torch.testing.assert_close(y, whole, rtol=1e-6, atol=1e-6)
    assert len(seen) == calls and sum(seen) == tokens and all(n % align == 0 for n in seen[:-1]), seen


def test_chunked_keeps_dtype_and_shape_bf16():
    ffn = _ffn(dtype=torch.bfloat16)
    x = torch.randn(1, 33, 48, dtype=torch.bfloat16)
    y = TokenChunkedFFN(4, align=8)(ffn, x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    torch.testing.assert_close(y, ffn(x), rtol=1.6e-2, atol=1e-2)  # bf16 rounding


def test_runner_choice_and_bad_counts():
    assert isinstance(ffn_runner(0), WholeFFN) and isinstance(ffn_runner(1), WholeFFN)
    assert ffn_runner(4).name == "4 token chunks"
    with pytest.raises(ValueError, match="at least 2"):
        TokenChunkedFFN(1)


def test_pipeline_call_chunks_every_block_records_it_and_undoes_it(tiny_pipe):
    """A per-call ffn_chunks reaches every block of both experts, is recorded in the result's backends, gives the
    whole-FFN result within fp32 rounding (the tiny model: 96 and 64 tokens, align 256 -> one chunk would be a
    no-op, so the runner is checked to have split by forcing a small alignment), and is undone after the call."""
    from wan.modules import ffn as F
    from wan.options import RuntimeOptions

    gen = dict(size=(64, 64), frame_num=5, shift=12.0, sampling_steps=2, guide_scale=3.0, seed=5,
               return_latents=True)
    _, ref = tiny_pipe.generate("a cat", **gen)
    assert tiny_pipe.last_result.backends["ffn"] == "whole"
    calls = []
    real = F.TokenChunkedFFN.__call__

    def spy(self, ffn, x):
        self.align = 8  # tiny token counts: chunk anyway
        calls.append(x.shape[1])
        return real(self, ffn, x)

    F.TokenChunkedFFN.__call__ = spy
    try:
        _, out = tiny_pipe.generate("a cat", options=RuntimeOptions(ffn_chunks=4), **gen)
    finally:
        F.TokenChunkedFFN.__call__ = real
    assert tiny_pipe.last_result.backends["ffn"] == "4 token chunks" and calls
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert ref.abs().mean() > 0.1
    assert all(isinstance(b.ffn_runner, WholeFFN) for m in (tiny_pipe.high_noise_model, tiny_pipe.low_noise_model)
               for b in m.blocks)


def test_bad_chunk_count_is_one_line():
    from wan.options import RuntimeOptions

    with pytest.raises(ValueError, match="ffn_chunks must be 0"):
        RuntimeOptions(ffn_chunks=17)
