"""The benchmark's peer (diffusers' WanTransformer3DModel, built by benchmarks.rows.peer_model_kwargs) computes the
same forward as our DiT: the tiny DiT's weights through diffusers' own key conversion, the same latent, timestep and
zero-padded text, fp32 on the CPU. A peer row is a like-for-like comparison only if this holds."""
import pytest
import torch

from benchmarks.rows import peer_model_kwargs
from wan.testing.tiny import build_tiny_dit

diffusers = pytest.importorskip("diffusers")


@torch.no_grad()
def test_peer_model_computes_our_forward():
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ours = build_tiny_dit(seed=5)  # every weight re-randomised: the reference's zero head would hide a mismatch
    peer = WanTransformer3DModel(**peer_model_kwargs("tiny")).eval()
    missing, unexpected = peer.load_state_dict(convert_wan_transformer_to_diffusers(ours.state_dict()), strict=False)
    assert not unexpected and all(k.startswith("rope.") for k in missing), (missing, unexpected)

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(16, 3, 8, 10, generator=g)  # [C, F, H, W] -> 3 * 4 * 5 = 60 tokens
    text = torch.randn(12, 4096, generator=g)
    t = torch.tensor([700])
    mine = ours([latent], t=t, context=[text], seq_len=60)[0]
    padded = torch.cat([text, text.new_zeros(512 - 12, 4096)])[None]  # our model zero-pads the text to 512 rows
    theirs = peer(hidden_states=latent[None], timestep=t, encoder_hidden_states=padded, return_dict=False)[0][0]

    assert mine.abs().mean() > 0.1  # a real output, not a zeroed head
    rel = ((theirs - mine).norm() / mine.norm()).item()
    assert rel < 1e-5, rel
