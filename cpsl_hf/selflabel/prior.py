"""Pseudo-label rectification and the moving-average class prior (distribution alignment)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassPrior", "class_argmax", "class_histogram", "rectify"]


def class_argmax(maps: torch.Tensor) -> torch.Tensor:
    """N x C x ... scores -> N x ... int64 index of the largest along the class axis (dim 1), the first one on
    ties (NaN counts as the largest): ``argmax(dim=1)``'s values. It is ``max(dim=1).indices``, which on the CPU
    reduces the class axis of a contiguous map several times faster than ``argmax(dim=1)`` (3.7x for
    8 x 19 x 128 x 128)."""
    return maps.max(dim=1).indices


def class_histogram(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Float32 counts (length C) of each class in integer ``labels`` of any shape; ``ignore_index`` and values
    outside [0, C) are not counted. No GPU-to-CPU sync."""
    flat = labels.reshape(-1)
    inside = (flat >= 0) & (flat < num_classes) & (flat != ignore_index)
    bins = torch.where(inside, flat, torch.full_like(flat, num_classes)).long()
    counts = torch.zeros(num_classes + 1, dtype=torch.float32, device=labels.device)
    counts.scatter_add_(0, bins, torch.ones_like(bins, dtype=torch.float32))
    return counts[:num_classes]


@torch.no_grad()
def rectify(
    p_sl: torch.Tensor,
    p_st: torch.Tensor,
    threshold: float = 0.0,
    ignore_index: int = 255,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectified pseudo labels ``argmax_c P_SL(c) * P_ST(c)``.

    Args:
        p_sl: N x C x h x w self-labeling probabilities (cosine head of the teacher).
        p_st: N x C x h x w soft pseudo label, same shape.
        threshold: pixels whose normalised product ``max_c p_sl p_st / sum_c p_sl p_st`` is below it become
            ``ignore_index`` (0 keeps every pixel).
        ignore_index: the label of ignored pixels.
        valid_mask: optional N x h x w bool; false pixels become ``ignore_index``. Pixels where the product is
            zero for every class (e.g. ``p_st`` all zero outside a warped view) are ignored too.

    Returns:
        N x h x w int64 labels.
    """
    if p_sl.shape != p_st.shape or p_sl.dim() != 4:
        raise ValueError(
            f"rectify: p_sl and p_st must both be N x C x h x w, got {tuple(p_sl.shape)} and {tuple(p_st.shape)}"
        )
    product = p_sl.float() * p_st.float()
    total = product.sum(dim=1)
    best, labels = product.max(dim=1)
    keep = total > 0
    if threshold > 0:
        keep = keep & (best >= threshold * total)
    if valid_mask is not None:
        if valid_mask.shape != labels.shape:
            raise ValueError(
                f"rectify: valid_mask must be N x h x w = {tuple(labels.shape)}, got {tuple(valid_mask.shape)}"
            )
        keep = keep & valid_mask.to(torch.bool)
    return torch.where(keep, labels, torch.full_like(labels, ignore_index))


class ClassPrior(nn.Module):
    """Moving-average class distribution ``r`` used as the Sinkhorn class marginal (distribution alignment).

    ``r_k = momentum * r_{k-1} + (1 - momentum) * h / sum(h)`` for each batch histogram ``h``; a batch without
    a single counted pixel leaves ``r`` unchanged. ``static=True`` never changes ``r`` (reference code).

    Args:
        initial: length-C non-negative tensor (counts or a distribution; normalised here).
        momentum: the EMA momentum alpha (0.999 in the paper).
        static: keep the initial distribution for ever.

    State: the buffer ``distribution`` (length C, float32), in ``state_dict()``.
    """

    def __init__(self, initial: torch.Tensor, momentum: float = 0.999, static: bool = False):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"ClassPrior: momentum must be in [0, 1], got {momentum}")
        initial = torch.as_tensor(initial, dtype=torch.float32)
        if initial.dim() != 1 or initial.numel() == 0:
            raise ValueError(
                f"ClassPrior: initial must be a non-empty 1-d tensor, got shape {tuple(initial.shape)}"
            )
        self.momentum = float(momentum)
        self.static = bool(static)
        self.register_buffer("distribution", torch.empty_like(initial))
        self.initialize_(initial)

    @classmethod
    def uniform(cls, num_classes: int, momentum: float = 0.999, static: bool = False) -> ClassPrior:
        return cls(torch.ones(num_classes), momentum=momentum, static=static)

    @property
    def num_classes(self) -> int:
        return self.distribution.numel()

    @torch.no_grad()
    def initialize_(self, histogram: torch.Tensor) -> None:
        """Set ``r`` to ``histogram / sum(histogram)`` (e.g. the class counts of argmax P_ST over the target
        set, SPEC ``r_0``). Validates the input, so it synchronises once: call it at start-up, not per step."""
        histogram = torch.as_tensor(histogram, dtype=torch.float32)
        if histogram.shape != self.distribution.shape:
            raise ValueError(
                f"ClassPrior.initialize_: histogram must have shape {tuple(self.distribution.shape)}, "
                f"got {tuple(histogram.shape)}"
            )
        if (
            bool((histogram < 0).any())
            or not bool(torch.isfinite(histogram).all())
            or float(histogram.sum()) <= 0
        ):
            raise ValueError(
                "ClassPrior.initialize_: histogram must be finite, non-negative, with a positive sum"
            )
        self.distribution.copy_(histogram / histogram.sum())

    @torch.no_grad()
    def update(self, batch_histogram: torch.Tensor, commit: torch.Tensor | None = None) -> None:
        """One EMA step towards the normalised ``batch_histogram`` (length C counts). No sync; no-op if static.
        A histogram that is not finite, or ``commit`` (0-dim bool tensor) false, leaves ``r`` unchanged."""
        if self.static:
            return
        histogram = batch_histogram.to(device=self.distribution.device, dtype=torch.float32)
        total = histogram.sum()
        target = histogram / total.clamp_min(torch.finfo(torch.float32).tiny)
        updated = self.momentum * self.distribution + (1.0 - self.momentum) * target
        apply = (total > 0) & torch.isfinite(total)
        if commit is not None:
            apply = apply & commit.to(device=apply.device, dtype=torch.bool)
        self.distribution.copy_(torch.where(apply, updated, self.distribution))

    def entropy(self) -> torch.Tensor:
        """0-dim tensor: Shannon entropy (nats) of ``r``."""
        r = self.distribution
        return -(r * torch.log(r.clamp_min(torch.finfo(r.dtype).tiny))).sum()

    def forward(self) -> torch.Tensor:
        return self.distribution

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, momentum={self.momentum}, static={self.static}"
