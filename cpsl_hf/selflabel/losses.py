"""CPSL losses: the self-labeling cross-entropy, the weak/strong consistency KL (both directions, or one as the
reference code), and the reverse / symmetric cross-entropy term of the reference code. All reductions are means
over the valid rows/pixels, computed in float32 whatever the autocast mode.

The consistency KL terms follow the reference code's reduction: its ``F.kl_div(..., reduction="none")`` is
masked over all N x C x h x w elements and divided by the mask's sum, i.e. a mean over classes as well as over
pixels (the pixel KL divided by C). Its weight lambda_2 = 5 is tuned for that scale: with a plain per-pixel
KL the same weight would be C (19) times stronger."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "masked_cross_entropy",
    "one_way_kl",
    "rce_loss",
    "self_labeling_loss",
    "symmetric_ce_loss",
    "symmetric_kl",
]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the true entries of ``mask`` (same shape; all entries when None; 0 if none)."""
    if mask is None:
        return values.mean()
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def self_labeling_loss(
    q: torch.Tensor, sl_logits: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``L_SL = - mean_i sum_c q(i, c) log softmax(sl_logits)(i, c)``.

    Args:
        q: B x C (or ... x C) Sinkhorn targets, rows summing to 1 (no gradient flows into them).
        sl_logits: same shape, the student's cosine scores / tau.
        valid: optional mask of shape ``q.shape[:-1]``; the mean runs over the true rows (0 if none).
    """
    if q.shape != sl_logits.shape:
        raise ValueError(
            f"self_labeling_loss: q {tuple(q.shape)} and sl_logits {tuple(sl_logits.shape)} differ"
        )
    with torch.autocast(device_type=sl_logits.device.type, enabled=False):
        per_row = -(q.detach().float() * F.log_softmax(sl_logits.float(), dim=-1)).sum(dim=-1)
        return _masked_mean(per_row, valid)


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor, valid_mask: torch.Tensor | None) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(
            f"{name}: both logits must be N x C x h x w, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if valid_mask is not None and valid_mask.shape != (a.shape[0], *a.shape[2:]):
        raise ValueError(
            f"{name}: valid_mask must be N x h x w = {(a.shape[0], *a.shape[2:])}, got {tuple(valid_mask.shape)}"
        )


def one_way_kl(
    logits_w: torch.Tensor, logits_s: torch.Tensor, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean_i KL(P_w || P_s) / C`` over valid pixels ``i`` (the reference code's consistency term and its
    reduction, see the module docstring; with ``P = softmax(logits)``, both from the self-labeling head there).
    N x C x h x w logits, N x h x w mask."""
    _check_pair("one_way_kl", logits_w, logits_s, valid_mask)
    with torch.autocast(device_type=logits_s.device.type, enabled=False):
        log_w = F.log_softmax(logits_w.float(), dim=1)
        log_s = F.log_softmax(logits_s.float(), dim=1)
        per_pixel = (log_w.exp() * (log_w - log_s)).mean(dim=1)
        return _masked_mean(per_pixel, valid_mask)


def symmetric_kl(
    logits_w: torch.Tensor, logits_s: torch.Tensor, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Paper Eq. 13: ``mean_i (KL(P_w || P_s) + KL(P_s || P_w)) / C`` over pixels valid in both views (the
    reference code's reduction, a mean over classes too: see the module docstring).

    Args:
        logits_w: N x C x h x w teacher logits on the weak view, already warped to the strong view.
        logits_s: N x C x h x w student logits on the strong view.
        valid_mask: N x h x w bool (true where the pixel exists in both views).
    Gradients flow into whichever input requires them (detach the teacher's).
    """
    _check_pair("symmetric_kl", logits_w, logits_s, valid_mask)
    with torch.autocast(device_type=logits_s.device.type, enabled=False):
        log_w = F.log_softmax(logits_w.float(), dim=1)
        log_s = F.log_softmax(logits_s.float(), dim=1)
        per_pixel = ((log_w.exp() - log_s.exp()) * (log_w - log_s)).mean(dim=1)
        return _masked_mean(per_pixel, valid_mask)


def rce_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, log_zero: float = 1e-4
) -> torch.Tensor:
    """Reverse cross-entropy ``- sum_c p(c) log y(c)`` with the one-hot label clamped to ``[log_zero, 1]``, i.e.
    ``-log(log_zero) * (1 - p(label))``; mean over labelled pixels. ``logits`` N x C x h x w, ``labels`` N x h x w."""
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"rce_loss: logits must be N x C x h x w and labels N x h x w, got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    labelled = labels != ignore_index
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = F.softmax(logits.float(), dim=1)
        safe = torch.where(labelled, labels, torch.zeros_like(labels)).long()
        p_label = probs.gather(1, safe[:, None]).squeeze(1)
        per_pixel = -torch.log(torch.tensor(log_zero, device=logits.device)) * (1.0 - p_label)
        return _masked_mean(per_pixel, labelled)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy of N x C x h x w ``logits`` to N x h x w ``labels``, mean over the labelled pixels, in float32;
    0 (with a zero gradient) when no pixel is labelled, where ``F.cross_entropy``'s mean would be NaN."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        per_pixel = F.cross_entropy(
            logits.float(), labels.long(), ignore_index=ignore_index, reduction="none"
        )
        return _masked_mean(per_pixel, labels != ignore_index)


def symmetric_ce_loss(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.1, beta: float = 1.0, ignore_index: int = 255
) -> torch.Tensor:
    """``alpha * CE + beta * RCE`` (the reference target loss, 0.1 CE + 1.0 RCE). Mean over labelled pixels."""
    ce = masked_cross_entropy(logits, labels, ignore_index=ignore_index)
    return alpha * ce + beta * rce_loss(logits, labels, ignore_index=ignore_index)
