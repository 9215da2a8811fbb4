"""A FIFO memory bank of embeddings: a fixed ring buffer with a device-side write pointer (MoCo's queue without
the requirement that the batch divides the size, and without shifting copies)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MemoryBank"]


class MemoryBank(nn.Module):
    """Ring buffer of the last ``size`` rows enqueued.

    State (buffers, so ``state_dict()`` checkpoints them): ``embeddings`` (size x dim), ``valid`` (size, bool:
    the slot holds a real row), ``pointer`` (0-dim int64: the slot the next row goes to). The fill level is
    ``valid``. :meth:`enqueue` only does index arithmetic on the device, so it never waits for the GPU.

    Args:
        size: number of rows kept.
        dim: row width (the embedding dimension D).
        dtype: storage dtype (float32 by default).
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"MemoryBank: size and dim must be positive, got size={size}, dim={dim}")
        self.size = int(size)
        self.dim = int(dim)
        self.register_buffer("embeddings", torch.zeros(self.size, self.dim, dtype=dtype))
        self.register_buffer("valid", torch.zeros(self.size, dtype=torch.bool))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append ``rows`` (n x dim), oldest rows are overwritten first; for n > size only the newest ``size``
        rows stay. ``valid`` (n, bool) marks placeholder rows (e.g. padding of an image with too few labelled
        pixels): they take a slot like any row but are excluded by :meth:`get`, ``len`` and ``valid``."""
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(
                f"MemoryBank.enqueue: rows must be n x {self.dim}, got shape {tuple(rows.shape)}"
            )
        if valid is not None and valid.shape != rows.shape[:1]:
            raise ValueError(
                f"MemoryBank.enqueue: valid must have shape ({rows.shape[0]},), got {tuple(valid.shape)}"
            )
        count = rows.shape[0]
        if count == 0:
            return
        kept = min(count, self.size)  # a static shape: n > size keeps the newest `size` rows
        rows = rows[count - kept :]
        offsets = torch.arange(count - kept, count, device=self.pointer.device)
        slots = (self.pointer + offsets) % self.size
        self.embeddings.index_copy_(0, slots, rows.to(self.embeddings.dtype))
        if valid is None:
            self.valid.index_fill_(0, slots, True)
        else:
            self.valid.index_copy_(0, slots, valid[count - kept :].to(torch.bool))
        self.pointer.copy_((self.pointer + count) % self.size)

    def fill_fraction(self) -> torch.Tensor:
        """0-dim float tensor: share of the slots holding a valid row (no sync)."""
        return self.valid.float().mean()

    @torch.no_grad()
    def get(self) -> torch.Tensor:
        """The valid rows, oldest first (m x dim). Synchronises (data-dependent shape): not for the hot path,
        where :attr:`embeddings` with :attr:`valid` as weights serves."""
        order = torch.roll(torch.arange(self.size, device=self.valid.device), -int(self.pointer))
        order = order[self.valid[order]]
        return self.embeddings[order]

    def __len__(self) -> int:
        return int(self.valid.sum())

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the bank."""
        self.embeddings.zero_()
        self.valid.zero_()
        self.pointer.zero_()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.embeddings.dtype}"
