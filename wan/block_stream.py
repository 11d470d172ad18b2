"""Block streaming: DiT blocks kept in (pinned) host memory run from a small ring of device buffers.

Every block of an expert has the same parameter shapes, so `slots` device buffers of one block's size serve all
of them. Per block call (forward hooks, outside any compiled graph):
  pre(i):  the compute stream waits for slot(i)'s copy-done event; block i's parameters point at the slot;
  post(i): block i's parameters point back at their host tensors; the slot's free event is recorded on the compute
           stream; block i + slots (in program order, wrapping to block 0 of the next step) is copied into the
           freed slot on a side stream that first waits for that free event.
So the copy of block i + 1 .. i + slots - 1 runs while block i computes. A block that was not prefetched (the first
block after the expert switch) is copied on demand. On the CPU the same machinery runs with synchronous copies.
Parameters keep their names and objects: `state_dict()` returns the host tensors, compiled block forwards see one
graph (parameters are graph inputs), and nothing moves outside this object.

Each block's parameters are views into ONE flat byte buffer (host: pinned; each slot: one device buffer with the same
layout), so a block is one allocation to pin and one copy to issue (~20 small pinned allocations per block made
pinning 57 GB take ~100 s on the H200 host).
"""
from __future__ import annotations

import torch

__all__ = ["BlockStreamer"]


class BlockStreamer:
    def __init__(self, device, slots: int, cyclic: bool = True):
        """cyclic: the last blocks prefetch the first ones of the next pass (the denoising loop); False for a model
        run once in a while (the text encoder), whose ring is released after each pass."""
        if slots < 1:
            raise ValueError(f"block streaming needs at least 1 slot, got {slots}")
        self.device, self.n, self.cyclic = torch.device(device), slots, cyclic
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.host: dict[int, list[torch.Tensor]] = {}  # model id -> per block, its flat host buffer
        self.host_views: dict[int, list[list[torch.Tensor]]] = {}  # model id -> per block, its parameters' views
        self.layout: tuple | None = None
        self.slots: list[torch.Tensor] | None = None  # flat device buffers
        self.slot_views: list[list[torch.Tensor]] = []
        self.where: dict[tuple[int, int], int] = {}  # (model id, block) -> slot holding it
        self.held: list[tuple[int, int] | None] = []
        self.ready: list = []
        self.free: list = []
        self.copies = 0  # blocks copied (for tests and logs)
        self.on_demand = 0  # of which not prefetched
        self._hooks = []

    # ---- setup ---------------------------------------------------------------------------------------------
    def add(self, model) -> None:
        """Move `model.blocks` to host memory (pinned on CUDA) and stream them from now on."""
        mid, blocks = id(model), list(model.blocks)
        layout = _layout(list(blocks[0].parameters()))
        host = []
        for block in blocks:
            params = list(block.parameters())
            if _layout(params) != layout:
                raise ValueError("block streaming needs every block of a model to have the same parameter shapes")
            flat = torch.empty(layout[-1], dtype=torch.uint8, pin_memory=self.cuda)
            for p, view in zip(params, _views(flat, layout)):
                view.copy_(p.data)
                p.data = view
            host.append(flat)
        if self.layout is None:
            self.n, self.layout = min(self.n, len(blocks)), layout
            self._allocate()
        elif layout != self.layout:
            raise ValueError("block streaming: every streamed model must have blocks of the same shapes")
        self.host[mid] = host
        self.host_views[mid] = [[p.data for p in block.parameters()] for block in blocks]
        for i, block in enumerate(blocks):
            self._hooks.append(block.register_forward_pre_hook(self._pre(mid, i)))
            self._hooks.append(block.register_forward_hook(self._post(mid, i)))

    def _allocate(self) -> None:
        self.slots = [torch.empty(self.layout[-1], dtype=torch.uint8, device=self.device) for _ in range(self.n)]
        self.slot_views = [_views(flat, self.layout) for flat in self.slots]
        self.held = [None] * self.n
        if self.cuda:
            self.ready = [torch.cuda.Event() for _ in range(self.n)]
            self.free = [torch.cuda.Event() for _ in range(self.n)]

    def release(self) -> None:
        """Give the device slots back (after the side stream's copies finish); the host copies stay, and the next
        block call allocates the slots again (for a model run once in a while, e.g. the text encoder)."""
        if self.slots is None:
            return
        if self.cuda:
            self.stream.synchronize()  # no copy may still write into a slot that the allocator hands out again
        self.slots, self.slot_views, self.held, self.where = None, [], [], {}

    # ---- the ring ------------------------------------------------------------------------------------------
    def _issue(self, key: tuple[int, int], s: int) -> None:
        """Copy block `key` into slot `s` (after the slot's last reader is done)."""
        old = self.held[s]
        if old is not None:
            self.where.pop(old, None)
        src = self.host[key[0]][key[1]]
        if self.cuda:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(self.free[s])
                self.slots[s].copy_(src, non_blocking=True)
                self.ready[s].record(self.stream)
        else:
            self.slots[s].copy_(src)
        self.held[s], self.where[key] = key, s
        self.copies += 1

    def _pre(self, mid: int, i: int):
        def hook(block, args):
            if self.slots is None:  # released since the last call
                self._allocate()
            key = (mid, i)
            s = self.where.get(key)
            if s is None:  # not prefetched (first use, or the first blocks after the expert switch)
                s = i % self.n
                self._issue(key, s)
                self.on_demand += 1
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self.ready[s])
            for p, dst in zip(block.parameters(), self.slot_views[s]):
                p.data = dst
        return hook

    def _post(self, mid: int, i: int):
        def hook(block, args, output):
            s = self.where[(mid, i)]
            for p, src in zip(block.parameters(), self.host_views[mid][i]):
                p.data = src
            if self.cuda:
                self.free[s].record(torch.cuda.current_stream(self.device))
            j, blocks = i + self.n, len(self.host[mid])
            nxt = (mid, j % blocks)
            if (self.cyclic or j < blocks) and nxt not in self.where:
                self._issue(nxt, s)
        return hook


_ALIGN = 256  # bytes: every view starts where any kernel (and any dtype) accepts it


def _layout(params: list[torch.Tensor]) -> tuple:
    """((shape, dtype, byte offset) per parameter, ..., total bytes) of one block's flat buffer."""
    entries, offset = [], 0
    for p in params:
        entries.append((tuple(p.shape), p.dtype, offset))
        offset += -(-p.numel() * p.element_size() // _ALIGN) * _ALIGN
    return (*entries, offset)


def _views(flat: torch.Tensor, layout: tuple) -> list[torch.Tensor]:
    """Typed, shaped views of `flat` (uint8) at the layout's offsets."""
    views = []
    for shape, dtype, offset in layout[:-1]:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        views.append(flat[offset:offset + n].view(dtype).view(shape))
    return views
