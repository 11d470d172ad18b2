"""Building and loading stay within the weights kept plus one tensor in flight, so a bf16 A14B expert (28.6 GB)
builds and loads on an 80 GB card: no whole fp32 copy of a model on the device, ever (issue: the benchmark's
fp32 build ran out of memory on an H100)."""
import weakref

import pytest
import torch

from wan.configs.model_config import TINY
from wan.modules.model import WanModel
from wan.testing.random_init import materialize_random_, randomize_weights_on_device_


class LiveFileTensors:
    """Wraps safetensors.safe_open (and, with `read`, the GGUF reader): counts the tensors read from files that are
    still alive (weak references) at each read, so a loader that keeps an fp32 tensor around while reading the next
    one is caught."""

    def __init__(self, safe_open):
        self.safe_open, self.live, self.max_live, self.max_live_bytes, self.largest = safe_open, [], 0, 0, 0

    def track(self, t):
        self.live = [r for r in self.live if r() is not None] + [weakref.ref(t)]
        nbytes = sum(r().numel() * r().element_size() for r in self.live)
        self.max_live = max(self.max_live, len(self.live))
        self.max_live_bytes = max(self.max_live_bytes, nbytes)
        self.largest = max(self.largest, t.numel() * t.element_size())
        return t

    def read(self, fn):
        """Wrap a function that returns one tensor read from a file (wan.formats.source.read_gguf_tensor)."""
        return lambda *args, **kwargs: self.track(fn(*args, **kwargs))

    def __call__(self, *args, **kwargs):
        tracker, handle = self, self.safe_open(*args, **kwargs)

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(handle, name)

            def get_tensor(self, key):
                return tracker.track(handle.get_tensor(key))

        return Handle()


@pytest.mark.parametrize("with_lora", [False, True])
def test_loader_keeps_one_file_tensor_alive_above_the_weights(monkeypatch, tmp_path, with_lora):
    """fp32 shards cast to bf16 while loading: when a tensor is read, no earlier fp32 tensor is still alive (the
    only memory above the kept bf16 weights is the one fp32 tensor in flight, plus a LoRA merge's temporaries)."""
    import safetensors

    from wan.modules.checkpoint import load_wan_model, save_wan_model
    from wan.testing.tiny import build_tiny_dit

    save_wan_model(build_tiny_dit(seed=1), tmp_path / "expert", max_shard_bytes=2**18)  # fp32, several shards
    assert len(list((tmp_path / "expert").glob("*.safetensors"))) > 2

    transform = None
    if with_lora:  # read before tracking: the LoRA's own (small) tensors stay alive by design
        from wan.configs import WAN_CONFIGS
        from wan.lora import LoraMerge
        from wan.testing.random_lora import write_random_lora_dir

        lora_dir = write_random_lora_dir(tmp_path / "lora", WAN_CONFIGS["t2v-tiny"].arch, rank=4)
        transform = LoraMerge(lora_dir / "high_noise_model.safetensors", 1.0)
    tracker = LiveFileTensors(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", tracker)
    model = load_wan_model(WanModel, tmp_path, "expert", torch.bfloat16, "cpu", transform=transform)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tracker.max_live == 1, f"{tracker.max_live} file tensors alive at once"
    assert tracker.max_live_bytes <= tracker.largest


@pytest.mark.parametrize("layout", ["diffusers", "comfy_fp16", "fp8_scaled", "gguf_q8_0", "gguf_q4_k",
                                    "gguf_q6_k"])
def test_every_layout_keeps_one_file_tensor_alive_above_the_weights(monkeypatch, tmp_path, tiny_ckpt, layout):
    """The same bound for every reader: Diffusers shards, a ComfyUI 16-bit file, fp8_scaled (its scalar scale is
    copied before the weight is read) and GGUF (dequantized to fp32, then cast)."""
    import safetensors

    import wan.formats.source as source_mod
    from wan.configs import WAN_CONFIGS
    from wan.formats import dit_source
    from wan.modules.checkpoint import load_dit
    from wan.testing import layouts as L

    cfg = WAN_CONFIGS["t2v-tiny"]
    expert = tiny_ckpt / "high_noise_model"
    if layout == "diffusers":
        path = L.write_diffusers_folder(tiny_ckpt, tmp_path / "d", cfg) / "transformer"
    elif layout == "comfy_fp16":
        path = L.write_comfy_dit(expert, tmp_path / "f.safetensors", torch.float16)
    elif layout == "fp8_scaled":
        path = L.write_fp8_scaled_dit(expert, tmp_path / "f.safetensors", cfg.arch)
    else:
        pytest.importorskip("gguf")
        path = tmp_path / "f.gguf"
        L.write_gguf_dit(expert, path, layout.removeprefix("gguf_").upper())
    source = dit_source(path, "x", cfg.arch)
    tracker = LiveFileTensors(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", tracker)
    monkeypatch.setattr(source_mod, "read_gguf_tensor", tracker.read(source_mod.read_gguf_tensor))
    model = load_dit(WanModel, source, torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tracker.largest > 0 and tracker.max_live == 1, f"{tracker.max_live} file tensors alive at once"
    assert tracker.max_live_bytes <= tracker.largest


def test_random_build_is_in_the_target_dtype_and_equals_the_fp32_draw():
    """materialize_random_ casts on meta, then draws per tensor in fp32: the same values as an fp32 model cast to
    bf16, without ever holding the fp32 model."""
    with torch.device("meta"):
        a, b = WanModel.from_config(TINY), WanModel.from_config(TINY)
    a = materialize_random_(a, "cpu", torch.bfloat16, seed=3)
    b = randomize_weights_on_device_(b.to_empty(device="cpu"), seed=3).to(torch.bfloat16)
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16}
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert all(p.abs().max() > 0 for p in a.parameters())  # nothing left at zero (the head included)


def test_random_build_refuses_buffers_it_would_leave_uninitialised():
    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("table", torch.ones(4))

    with torch.device("meta"):
        m = WithBuffer()
    with pytest.raises(ValueError, match="table"):
        materialize_random_(m, "cpu", torch.bfloat16)
    with torch.device("meta"):
        m = WithBuffer()
    assert materialize_random_(m, "cpu", torch.bfloat16, rebuilt_buffers=("table",)).lin.weight.dtype == torch.bfloat16
