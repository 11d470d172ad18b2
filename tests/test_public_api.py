"""The reference's public names and signatures, which other projects' scripts import and call."""
import inspect

import wan
from wan.modules.model import WanModel
from wan.modules.t5 import T5EncoderModel
from wan.modules.vae import Wan2_1_VAE
from wan.modules.vae2_2 import Wan2_2_VAE
from wan.text2video import WanT2V


def params(fn):
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n != "self"}


def test_pipeline_signatures():
    assert wan.WanT2V is WanT2V
    init = params(WanT2V.__init__)
    for name, default in dict(device_id=0, rank=0, t5_fsdp=False, dit_fsdp=False, use_sp=False, t5_cpu=False,
                              convert_model_dtype=False).items():
        assert init[name] == default, name
    assert list(init)[:2] == ["config", "checkpoint_dir"]
    gen = params(WanT2V.generate)
    assert list(gen)[:10] == ["input_prompt", "size", "frame_num", "shift", "sample_solver", "sampling_steps",
                              "guide_scale", "n_prompt", "seed", "offload_model"]
    assert (gen["size"], gen["frame_num"], gen["shift"], gen["sample_solver"], gen["sampling_steps"],
            gen["guide_scale"], gen["n_prompt"], gen["seed"], gen["offload_model"]) == \
        ((1280, 720), 81, 5.0, "unipc", 50, 5.0, "", -1, None)  # offload_model None: the built placement


def test_model_signatures():
    init = params(WanModel.__init__)
    assert init == dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=2048, ffn_dim=8192,
                        freq_dim=256, text_dim=4096, out_dim=16, num_heads=16, num_layers=32, window_size=(-1, -1),
                        qk_norm=True, cross_attn_norm=True, eps=1e-6)
    assert list(params(WanModel.forward)) == ["x", "t", "context", "seq_len", "y"]
    assert list(params(WanModel.from_pretrained))[:2] == ["checkpoint_dir", "subfolder"]
    assert list(params(T5EncoderModel.__init__)) == ["text_len", "dtype", "device", "checkpoint_path",
                                                     "tokenizer_path", "shard_fn"]
    assert list(params(Wan2_1_VAE.__init__)) == ["z_dim", "vae_pth", "dtype", "device", "decode_bands"]
    assert list(params(Wan2_2_VAE.__init__))[:7] == ["z_dim", "c_dim", "vae_pth", "dim_mult", "temperal_downsample",
                                                      "dtype", "device"]
