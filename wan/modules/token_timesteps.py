"""Per-token timesteps in factored form, and the rows of the time embedding a forward computes.

The reference's TI2V image mode gives the DiT one timestep per token, [B, L]: 0 on the tokens of latent frame 0
(the image, already clean) and t on every other token. Only two values occur, so the pipeline passes them
factored: `TokenTimesteps(values [B, K], index [L])`, token j of sample b taking values[b, index[j]].

`time_rows` turns any accepted timestep argument into the rows the time-embedding MLP runs on:
- the reference forms (per token): [B] expanded to [B, L]; [B, L] as given; TokenTimesteps densified to [B, L];
- the per-sample fast form (`fast_time_embedding`): [B] as [B, 1], broadcast over the tokens; TokenTimesteps as
  its K distinct values [B, K], whose embeddings are gathered per token afterwards (`index`). The MLP acts on each
  row alone, so the gathered rows are the per-token rows (the same math; a kernel may round differently for 2 rows
  than for L, as for [B, 1]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenTimesteps:
    values: torch.Tensor  # [B, K] float32: the distinct timesteps of each sample
    index: torch.Tensor  # [L] int64 in [0, K): which value each token (padding included) takes

    def dense(self) -> torch.Tensor:
        """[B, L] float32, as the reference builds it."""
        return self.values[:, self.index]

    def expand(self, batch: int) -> "TokenTimesteps":
        """The same timesteps for `batch` samples (batched CFG: t.expand(2))."""
        return TokenTimesteps(self.values.expand(batch, -1), self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Sample i's dense [L] timesteps."""
        return self.values[i][self.index]


def time_rows(t, batch: int, seq_len: int, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows [B, R], index [L] or None): the time-embedding MLP runs on rows; with an index its outputs are
    gathered per token (row index[j] for token j). R = L (per token), 1 (one t per sample) or K (factored)."""
    if isinstance(t, TokenTimesteps):
        if t.index.numel() != seq_len:
            raise ValueError(f"per-token timesteps cover {t.index.numel()} tokens, the sequence has {seq_len}")
        return (t.values, t.index) if per_sample else (t.dense(), None)
    if t.dim() == 1:
        return t.view(-1, 1).expand(batch, 1 if per_sample else seq_len), None
    if t.dim() == 2 and t.shape[1] == seq_len:
        return t, None  # the reference's per-token form, used as given
    raise ValueError(f"t must be [B], [B, seq_len] or TokenTimesteps, got shape {tuple(t.shape)}")
