"""Class-mean prototypes for initialising the self-labeling head (SPEC, online self-labeling step 1):
``z_c = sum_{n,i} Y_ST(n,i,c) z(n,i) / |Gamma_c|`` with ``Y_ST`` the one-hot argmax of ``P_ST``, then L2-normalised.
Sums and counts are accumulated over any number of batches and all-reduced across processes, so the result is
the mean over the whole target set (not a mean of per-batch or per-process means)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .prior import class_argmax

__all__ = ["PrototypeAccumulator", "prototypes_from_features"]


class PrototypeAccumulator(nn.Module):
    """Running per-class embedding sums (float64) and pixel counts.

    Args:
        num_classes: C.
        dim: embedding dimension D.

    Buffers: ``sums`` (C x D float64), ``counts`` (C float64).
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.register_buffer("sums", torch.zeros(self.num_classes, self.dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(self.num_classes, dtype=torch.float64))

    @torch.no_grad()
    def update(
        self,
        embeddings: torch.Tensor,
        probs: torch.Tensor,
        valid_mask: torch.Tensor | None = None,
        ignore_index: int = 255,
    ) -> None:
        """Add one batch.

        Args:
            embeddings: N x D x h x w pixel embeddings (the teacher's).
            probs: N x C x h x w class probabilities (``P_ST``; each pixel counts for its argmax class), or
                N x h x w integer labels with ``ignore_index``.
            valid_mask: optional N x h x w bool; false pixels are skipped.
            ignore_index: for integer ``probs``.
        """
        if embeddings.dim() != 4 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"PrototypeAccumulator.update: embeddings must be N x {self.dim} x h x w, got {tuple(embeddings.shape)}"
            )
        num_images, _, height, width = embeddings.shape
        if probs.dtype.is_floating_point:
            if probs.shape != (num_images, self.num_classes, height, width):
                raise ValueError(
                    "PrototypeAccumulator.update: probs must be N x C x h x w = "
                    f"{(num_images, self.num_classes, height, width)}, got {tuple(probs.shape)}"
                )
            labels = class_argmax(probs)
        else:
            if probs.shape != (num_images, height, width):
                raise ValueError(
                    "PrototypeAccumulator.update: integer labels must be N x h x w = "
                    f"{(num_images, height, width)}, got {tuple(probs.shape)}"
                )
            labels = probs.long()
        inside = (labels >= 0) & (labels < self.num_classes) & (labels != ignore_index)
        if valid_mask is not None:
            if valid_mask.shape != labels.shape:
                raise ValueError(
                    f"PrototypeAccumulator.update: valid_mask must be {tuple(labels.shape)}, got {tuple(valid_mask.shape)}"
                )
            inside = inside & valid_mask.to(torch.bool)
        bins = torch.where(inside, labels, torch.full_like(labels, self.num_classes)).reshape(-1)
        rows = embeddings.permute(0, 2, 3, 1).reshape(-1, self.dim).to(self.sums.device, torch.float64)
        bins = bins.to(self.sums.device)
        sums = torch.zeros(self.num_classes + 1, self.dim, dtype=torch.float64, device=self.sums.device)
        sums.index_add_(0, bins, rows)
        counts = torch.zeros(self.num_classes + 1, dtype=torch.float64, device=self.sums.device)
        counts.scatter_add_(0, bins, torch.ones_like(bins, dtype=torch.float64))
        self.sums += sums[: self.num_classes]
        self.counts += counts[: self.num_classes]

    @torch.no_grad()
    def all_reduce(self, process_group=None) -> None:
        """Sum ``sums`` and ``counts`` over the processes (no-op without an initialised process group). Call it
        once, after the last :meth:`update`, on every process."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sums, group=process_group)
            torch.distributed.all_reduce(self.counts, group=process_group)

    @torch.no_grad()
    def compute(self, normalize: bool = True) -> torch.Tensor:
        """C x D float32 class means (L2-normalised when ``normalize``). A class that was never seen gets a zero
        row (check ``counts`` to detect it)."""
        means = self.sums / self.counts.clamp_min(1.0)[:, None]
        if normalize:
            means = F.normalize(means, dim=1)
        return means.float()

    @torch.no_grad()
    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()


@torch.no_grad()
def prototypes_from_features(
    embeddings: torch.Tensor,
    probs: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    normalize: bool = True,
    ignore_index: int = 255,
) -> torch.Tensor:
    """C x D class-mean prototypes of one batch (see :class:`PrototypeAccumulator` for many batches and
    processes). ``embeddings`` N x D x h x w; ``probs`` N x C x h x w probabilities (argmax assignment) — the
    number of classes is read from it, so integer labels need the accumulator."""
    if not probs.dtype.is_floating_point or probs.dim() != 4:
        raise ValueError(
            "prototypes_from_features: probs must be float N x C x h x w "
            f"(use PrototypeAccumulator for integer labels), got {probs.dtype} {tuple(probs.shape)}"
        )
    accumulator = PrototypeAccumulator(probs.shape[1], embeddings.shape[1]).to(embeddings.device)
    accumulator.update(embeddings, probs, valid_mask=valid_mask, ignore_index=ignore_index)
    return accumulator.compute(normalize=normalize)
