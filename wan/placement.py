"""Where the experts and the text encoder live: one small object per strategy, chosen once when the pipeline is
built, and the only code that moves weights between host and GPU.

- `Resident`: both experts on the device for the whole run; T5 stays in host memory (pinned on CUDA) and encodes
  from a temporary device copy (or on the CPU with t5_cpu), or, with t5_stream, streamed by layers as below (the
  memory plan's choice where T5's whole copy beside the resident DiTs would be the run's peak).
- `ExpertOffload`: the reference on one GPU: experts load into host memory, the active one is moved up and the
  other down at the expert switch, both go down after sampling; T5 goes up to encode and back down.
- `BlockStreamed`: both experts' blocks in pinned host memory, the running block copied into a small ring of device
  buffers a few blocks ahead on a side stream (wan/block_stream.py); embeddings and head resident. T5 is streamed
  by layers the same way (its own ring, given back after each encode; the token embedding looked up on the host).
  For cards that cannot hold an expert.
- `Sharded`: FSDP2 over the whole world (per-block units, bf16 gathers on GPUs); T5 optionally sharded too.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

log = logging.getLogger("wan")
CPU = torch.device("cpu")


@contextmanager
def temporary_copy(module: torch.nn.Module, device: torch.device):
    """Run `module` from a device copy of its weights, then point it back at the untouched host tensors."""
    tensors = list(module.parameters()) + list(module.buffers())
    host = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.to(device, non_blocking=True, copy=True)
        yield module
    finally:
        for t, h in zip(tensors, host):
            t.data = h


def _on(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class Placement:
    name = "?"
    load_device: torch.device = CPU  # where the experts' tensors are read to

    def __init__(self, device: torch.device, t5_cpu: bool):
        self.device, self.t5_cpu = torch.device(device), t5_cpu
        self.experts: dict[str, torch.nn.Module] = {}
        self.text_encoder = None
        self.t5: StreamedT5 | None = None  # T5 streamed by layers (BlockStreamed, or Resident with t5_stream)

    @property
    def t5_streamer(self):
        """The T5 layers' device ring (a BlockStreamer), or None where T5 is not streamed."""
        return self.t5.streamer if self.t5 is not None else None

    def attach(self, experts: dict, text_encoder) -> None:
        """Take the loaded experts ({"high": ..., "low": ...}) and T5 and put them where they live."""
        self.experts, self.text_encoder = experts, text_encoder

    def expert(self, name: str) -> torch.nn.Module:
        """The expert `name`, ready to run on the device."""
        return self.experts[name]

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        """T5 embeddings of `texts` on the device, one [n_i, 4096] tensor per text."""
        if self.t5 is not None and self.t5.attached:
            return self.t5.encode(self.text_encoder, texts)
        if self.t5_cpu or self.device.type == "cpu":
            return [u.to(self.device) for u in self.text_encoder(texts, CPU)]
        with temporary_copy(self.text_encoder.model, self.device):
            return self.text_encoder(texts, self.device)

    def release(self) -> None:
        """After sampling (before the VAE decode)."""

    def _pin_text_encoder(self) -> None:
        """T5 in pinned host memory: the temporary upload before each encode runs at full PCIe speed."""
        if self.device.type == "cuda" and not self.t5_cpu and self.text_encoder is not None:
            for t in list(self.text_encoder.model.parameters()) + list(self.text_encoder.model.buffers()):
                if t.device.type == "cpu" and not t.is_pinned():
                    t.data = t.data.pin_memory()

    def describe(self) -> str:
        if self.t5 is not None and self.t5.attached:
            t5 = self.t5.describe()
        else:
            t5 = "T5 in " + ("CPU" if self.t5_cpu else f"host memory, encoding on {self.device}")
        return f"{self.name}: experts on {self.where()}, {t5}"

    def where(self) -> str:
        return ", ".join(f"{k} {_on(m)}" for k, m in self.experts.items()) if self.experts else "-"


class StreamedT5:
    """umt5's 24 equal blocks (81.6% of its 11.4 GB in bf16) through SLOTS device buffers (wan/block_stream.py, not
    cyclic), given back after each encode; the token embedding (the other 18.4%) stays in host memory and looks up
    only the prompt's rows there; the final norm lives on the device. Bit for bit the resident encode."""
    SLOTS = 2

    def __init__(self, device: torch.device):
        from .block_stream import BlockStreamer

        self.device = device
        self.streamer = BlockStreamer(device, self.SLOTS, cyclic=False)
        self._stack = None  # BlockStreamer streams `.blocks` of what it is given; kept alive (the streamer keys by id)

    @property
    def attached(self) -> bool:
        return self._stack is not None

    def attach(self, t5: torch.nn.Module) -> None:
        from types import SimpleNamespace

        stack = t5.encoder
        self._stack = SimpleNamespace(blocks=stack.block)
        self.streamer.add(self._stack)
        if self.device.type == "cuda":
            for t in stack.embed_tokens.parameters():
                if t.device.type == "cpu" and not t.is_pinned():
                    t.data = t.data.pin_memory()
        stack.final_layer_norm.to(self.device)
        host = stack.embed_tokens.weight.device
        stack.embed_tokens.register_forward_pre_hook(lambda m, args: (args[0].to(host),))
        stack.embed_tokens.register_forward_hook(lambda m, args, out: out.to(self.device, non_blocking=True))

    def encode(self, text_encoder, texts: list[str]) -> list[torch.Tensor]:
        try:
            return text_encoder(texts, self.device)
        finally:
            self.streamer.release()  # the ring is not needed until the next prompt

    def describe(self) -> str:
        return (f"T5 in host memory streamed by layers through {self.streamer.n} device slots of "
                f"{self.streamer.layout[-1] / 1e9:.2f} GB")


class Resident(Placement):
    name = "resident"

    def __init__(self, device, t5_cpu, t5_stream: bool = False):
        super().__init__(device, t5_cpu)
        self.load_device = self.device
        self.t5 = StreamedT5(self.device) if t5_stream and not t5_cpu else None

    def attach(self, experts, text_encoder):
        super().attach(experts, text_encoder)
        for m in experts.values():
            m.to(self.device)
        if self.t5 is not None and text_encoder is not None:
            self.t5.attach(text_encoder.model)
        else:
            self._pin_text_encoder()


class ExpertOffload(Placement):
    name = "expert offload (reference)"

    def expert(self, name):
        needed = self.experts[name]
        if self.device.type == "cuda":
            for other in self.experts.values():
                if other is not needed and _on(other).type == "cuda":
                    other.to(CPU)
            if _on(needed).type == "cpu":
                needed.to(self.device)
        return needed

    def encode(self, texts):
        if self.t5_cpu or self.device.type == "cpu":
            return super().encode(texts)
        t5 = self.text_encoder.model
        t5.to(self.device)  # the reference: up, encode, back down
        try:
            return self.text_encoder(texts, self.device)
        finally:
            t5.to(CPU)

    def release(self):
        if self.device.type == "cuda":
            for m in self.experts.values():
                m.to(CPU)
            torch.cuda.empty_cache()


class BlockStreamed(Placement):
    name = "block-streamed"

    def __init__(self, device, t5_cpu, slots: int):
        super().__init__(device, t5_cpu)
        from .block_stream import BlockStreamer

        self.streamer = BlockStreamer(self.device, slots)
        self.t5 = None if t5_cpu else StreamedT5(self.device)

    def attach(self, experts, text_encoder):
        super().attach(experts, text_encoder)
        for m in {id(m): m for m in experts.values()}.values():  # one expert may serve both noise levels
            self.streamer.add(m)  # blocks to (pinned) host memory; the rest (embeddings, head) to the device
            for name, child in m.named_children():
                if name != "blocks":
                    child.to(self.device)
        if self.t5 is not None and text_encoder is not None:
            self.t5.attach(text_encoder.model)

    def where(self):
        return (f"host memory (blocks, {'pinned' if self.device.type == 'cuda' else 'pageable'}) streamed through "
                f"{self.streamer.n} device slots of {self.streamer.layout[-1] / 1e9:.2f} GB; "
                f"embeddings and head on {self.device}")


class Sharded(Placement):
    name = "FSDP"

    def __init__(self, device, t5_cpu, mesh, t5_fsdp: bool, param_dtype: torch.dtype):
        super().__init__(device, t5_cpu)
        self.mesh, self.t5_fsdp, self.param_dtype = mesh, t5_fsdp, param_dtype

    def attach(self, experts, text_encoder):
        from .distributed.fsdp import shard_model, shard_t5

        super().attach(experts, text_encoder)
        for m in experts.values():  # per-block units, gathered in param_dtype
            shard_model(m, self.mesh, param_dtype=self.param_dtype)
        if self.t5_fsdp:
            text_encoder.model = shard_t5(text_encoder.model, self.mesh)

    def encode(self, texts):
        if self.t5_fsdp:
            return self.text_encoder(texts, self.device)
        return super().encode(texts)

    def where(self):
        return f"sharded over {self.mesh.size()} ranks"


def choose_placement(offload_model: bool | None, device: torch.device, world: int, t5_cpu: bool,
                     dit_fsdp: bool = False, t5_fsdp: bool = False, mesh=None,
                     param_dtype: torch.dtype = torch.bfloat16, stream_blocks: int = 0,
                     t5_stream: bool = False) -> tuple[Placement, bool]:
    """(placement, resolved offload_model). offload_model None: the reference's default, true on one GPU only.
    t5_stream (RuntimeOptions refuses it with offload, FSDP or t5_cpu): a resident run streams T5 by layers."""
    device = torch.device(device)
    if stream_blocks:  # RuntimeOptions refuses it with offload_model true or dit_fsdp
        return BlockStreamed(device, t5_cpu, stream_blocks), False
    if dit_fsdp and world > 1:
        if offload_model:
            raise ValueError("--offload_model true cannot be combined with --dit_fsdp: the shards stay on the GPUs")
        return Sharded(device, t5_cpu, mesh, t5_fsdp, param_dtype), False
    if offload_model is None:
        offload_model = device.type == "cuda" and world == 1
    if offload_model and world > 1:
        raise ValueError(f"--offload_model true is not supported with {world} ranks (each rank keeps both experts "
                         "resident); drop it, or add --dit_fsdp to shard the experts instead")
    if offload_model and device.type == "cpu":
        offload_model = False  # nowhere to offload to: the CPU run is resident by definition
    if offload_model and t5_stream:
        raise ValueError("--t5_stream is for a resident run (--offload_model false) or --stream_blocks, which "
                         "streams T5 anyway; the reference's offload moves T5 whole")
    return (ExpertOffload(device, t5_cpu) if offload_model else Resident(device, t5_cpu, t5_stream)), offload_model
