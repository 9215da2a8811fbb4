"""A FIFO memory bank of embeddings: a fixed ring buffer with a device-side write pointer (MoCo's queue without
the requirement that the batch divides the size, and without shifting copies)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["BankUndo", "MemoryBank"]


class BankUndo(NamedTuple):
    """What one :meth:`MemoryBank.enqueue` overwrote: the k slots (int64), their previous rows (k x dim) and
    valid flags (k), and the previous pointer (0-dim)."""

    slots: torch.Tensor
    rows: torch.Tensor
    valid: torch.Tensor
    pointer: torch.Tensor


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
    def enqueue(
        self, rows: torch.Tensor, valid: torch.Tensor | None = None, commit: torch.Tensor | None = None
    ) -> BankUndo | None:
        """Append ``rows`` (n x dim), oldest rows are overwritten first; for n > size only the newest ``size``
        rows stay. ``valid`` (n, bool) marks placeholder rows (e.g. padding of an image with too few labelled
        pixels): they take a slot like any row but are excluded by :meth:`get`, ``len`` and ``valid``.

        ``commit`` (0-dim bool tensor, e.g. "the rows are finite"): when false the bank stays exactly as it was
        (the writes are masked on the device, nothing waits). Returns what :meth:`revert_` needs to undo this
        enqueue later (None for n = 0)."""
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
            return None
        kept = min(count, self.size)  # a static shape: n > size keeps the newest `size` rows
        rows = rows[count - kept :].to(self.embeddings.dtype)
        offsets = torch.arange(count - kept, count, device=self.pointer.device)
        slots = (self.pointer + offsets) % self.size  # distinct slots (kept <= size)
        new_valid = (
            torch.ones(kept, dtype=torch.bool, device=self.valid.device)
            if valid is None
            else valid[count - kept :].to(torch.bool)
        )
        undo = BankUndo(slots, self.embeddings[slots], self.valid[slots], self.pointer.clone())
        if commit is not None:
            commit = commit.to(device=self.pointer.device, dtype=torch.bool)
            rows = torch.where(commit, rows, undo.rows)
            new_valid = torch.where(commit, new_valid, undo.valid)
        self.embeddings.index_copy_(0, slots, rows)
        self.valid.index_copy_(0, slots, new_valid)
        advanced = (self.pointer + count) % self.size
        self.pointer.copy_(advanced if commit is None else torch.where(commit, advanced, self.pointer))
        return undo

    @torch.no_grad()
    def revert_(self, undo: BankUndo | None, keep: torch.Tensor) -> None:
        """Undo the :meth:`enqueue` that returned ``undo`` unless ``keep`` (0-dim bool tensor), on the device.
        Several enqueues are undone newest first."""
        if undo is None:
            return
        keep = keep.to(device=self.pointer.device, dtype=torch.bool)
        self.embeddings.index_copy_(0, undo.slots, torch.where(keep, self.embeddings[undo.slots], undo.rows))
        self.valid.index_copy_(0, undo.slots, torch.where(keep, self.valid[undo.slots], undo.valid))
        self.pointer.copy_(torch.where(keep, self.pointer, undo.pointer))

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
