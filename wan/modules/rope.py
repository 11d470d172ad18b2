"""3-D rotary position embedding of the Wan DiT: the reference's float64 form and an exact fp32 fast form.

Head dim 128 = 64 complex pairs from ADJACENT channels (2i, 2i+1), split 22 / 21 / 21 over frame / height / width.
Token (f, h, w) of a flattened F x H x W grid gets frame angle[f] ++ height angle[h] ++ width angle[w]; padded tokens
are not rotated. Both forms take a per-token table built once per forward (`prepare`) and rotate q and k in every
block (`apply`), so the same tables can be sliced per rank for sequence parallelism.
"""
from __future__ import annotations

import torch

MAX_POSITIONS = 1024


def rope_angles(max_positions: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """[max_positions, dim // 2] float64 angles p * theta^(-2i/dim), as the reference's rope_params."""
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64, device="cpu").div(dim))
    return torch.outer(torch.arange(max_positions, dtype=torch.float64, device="cpu"), inv)


def axis_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis: (22, 21, 21) for head_dim 128."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def token_angles(head_dim: int, grid: tuple[int, int, int], device="cpu") -> torch.Tensor:
    """[F*H*W, head_dim // 2] float64 angles for one grid, f-major then h then w."""
    f, h, w = grid
    d = head_dim
    table = torch.cat([rope_angles(MAX_POSITIONS, d - 4 * (d // 6)),
                       rope_angles(MAX_POSITIONS, 2 * (d // 6)),
                       rope_angles(MAX_POSITIONS, 2 * (d // 6))], dim=1).to(device)
    tf, th, tw = table.split(axis_split(d), dim=1)
    return torch.cat([tf[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                      th[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                      tw[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, -1)


class ReferenceRope:
    """The reference's math: complex128 unit factors, x viewed as complex in float64, output fp32."""

    name = "reference (float64 complex)"

    def __init__(self, head_dim: int):
        self.head_dim = head_dim

    def prepare(self, grids: list[tuple[int, int, int]], seq_len: int, device) -> torch.Tensor:
        """[B, seq_len, 1, head_dim/2] complex128; padded tokens get 1+0j (an exact no-op)."""
        out = torch.ones(len(grids), seq_len, self.head_dim // 2, dtype=torch.complex128, device=device)
        for i, grid in enumerate(grids):
            ang = token_angles(self.head_dim, grid, device)
            out[i, : ang.size(0)] = torch.polar(torch.ones_like(ang), ang)
        return out.unsqueeze(2)

    @staticmethod
    def apply(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """x [B, L, H, D] -> fp32 [B, L, H, D]; factors [B|1, L, 1, D/2] complex128."""
        xc = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * factors).flatten(3).float()


class FastRope:
    """Same rotation in fp32 from cached cos/sin tables (no complex128, no per-block table building).

    Tables are cached per (grids, seq_len, device); a batch whose samples share one grid uses one [1, L] table.
    """

    name = "fast (fp32 cos/sin tables)"

    def __init__(self, head_dim: int):
        self.head_dim = head_dim
        self._cache: dict = {}

    def prepare(self, grids: list[tuple[int, int, int]], seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [B|1, seq_len, 1, head_dim/2] fp32; padded tokens get cos 1, sin 0."""
        uniq = grids if len(set(grids)) > 1 else grids[:1]
        key = (tuple(uniq), seq_len, str(device))
        if key not in self._cache:
            cos = torch.ones(len(uniq), seq_len, self.head_dim // 2, dtype=torch.float64)
            sin = torch.zeros_like(cos)
            for i, grid in enumerate(uniq):
                ang = token_angles(self.head_dim, grid)
                cos[i, : ang.size(0)], sin[i, : ang.size(0)] = ang.cos(), ang.sin()
            self._cache[key] = (cos.float().unsqueeze(2).to(device), sin.float().unsqueeze(2).to(device))
        return self._cache[key]

    @staticmethod
    def apply(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, L, H, D] -> fp32 [B, L, H, D], pairs (2i, 2i+1) rotated by the table's angles."""
        cos, sin = table
        xr = x.float().unflatten(-1, (-1, 2))
        x0, x1 = xr[..., 0], xr[..., 1]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(3)
