"""Class-balanced Sinkhorn-Knopp (SwAV's ``distributed_sinkhorn`` with a class prior instead of 1/C).

The transport plan is kept in its factored form ``Q = diag(u) K diag(v)`` with ``K = exp((S - max S) / eps)``:
each iteration is two matrix-vector products instead of rescaling the whole B x C matrix twice, and the plan is
materialised once at the end. In exact arithmetic this is the textbook iteration (normalise the total mass to 1,
then ``iterations`` times: class masses to ``prior``, pixel masses to ``1/B``); the global normalisation and the
subtracted maximum are constant factors that cancel.
"""

from __future__ import annotations

import torch

__all__ = ["sinkhorn"]


def _promote(dtype: torch.dtype) -> torch.dtype:
    """The working precision: float64 stays float64, everything else (fp16, bf16, fp32) becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    prior: torch.Tensor | None = None,
    epsilon: float = 0.05,
    iterations: int = 3,
    weights: torch.Tensor | None = None,
    all_reduce: bool = False,
    process_group=None,
) -> torch.Tensor:
    """Soft cluster assignments with class marginals ``prior`` (balanced optimal transport, Sinkhorn-Knopp).

    Args:
        scores: B x C similarities (cosines in [-1, 1]) between B samples and C class prototypes. Any float dtype;
            the computation runs in float32 (float64 if ``scores`` is float64) with autocast disabled.
        prior: length-C class distribution ``r`` (non-negative; normalised here to sum 1). ``None`` = uniform.
        epsilon: entropic regularisation; ``Q`` starts as ``exp(scores / epsilon)``.
        iterations: number of (class, pixel) rescaling rounds.
        weights: optional length-B mask (bool or 0/1) of the rows that take part. Rows with weight 0 get zero mass
            and a zero row in the result; the result on the other rows equals running on those rows alone
            (``B`` is then the number of rows with weight 1). This lets a partially filled, fixed-size memory
            bank take part without a data-dependent shape (no GPU-to-CPU sync).
        all_reduce: the rows are sharded across the processes of ``process_group`` (each process passes its own
            rows): column sums, the row count and the maximum are all-reduced so every process gets its rows of
            the plan computed on the union, as SwAV's ``distributed_sinkhorn``. :class:`SelfLabeling` does *not*
            need this: it gathers the samples and runs the same Sinkhorn everywhere.
        process_group: the ``torch.distributed`` group for ``all_reduce`` (default: the world).

    Returns:
        B x C plan in the working precision, ``B * Q``: every (participating) row sums to 1 and column ``c`` sums
        to about ``B * prior[c]`` (exactly after the class step, before the final pixel step).
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn: scores must be B x C, got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn: epsilon must be positive, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"sinkhorn: iterations must be >= 1, got {iterations}")
    num_rows, num_classes = scores.shape
    dtype = _promote(scores.dtype)
    if prior is not None and prior.shape != (num_classes,):
        raise ValueError(f"sinkhorn: prior must have shape ({num_classes},), got {tuple(prior.shape)}")
    if weights is not None and weights.shape != (num_rows,):
        raise ValueError(f"sinkhorn: weights must have shape ({num_rows},), got {tuple(weights.shape)}")
    distributed = all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized()

    with torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.to(dtype)
        tiny = torch.finfo(dtype).tiny
        if prior is None:
            class_mass = torch.full((num_classes,), 1.0 / num_classes, dtype=dtype, device=scores.device)
        else:
            class_mass = prior.to(device=scores.device, dtype=dtype)
            class_mass = class_mass / class_mass.sum().clamp_min(tiny)
        if weights is None:
            row_weight = torch.ones(num_rows, dtype=dtype, device=scores.device)
            shift = scores.max()  # one maximum for the whole problem (not per row): Q is only scaled
        else:
            row_weight = weights.to(device=scores.device, dtype=dtype)
            taking_part = row_weight > 0
            row_max = scores.max(dim=1).values
            shift = torch.where(taking_part, row_max, torch.full_like(row_max, float("-inf"))).max()
        total_rows = row_weight.sum()
        if distributed:
            torch.distributed.all_reduce(total_rows, group=process_group)
            torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX, group=process_group)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # no participating row

        # K = exp((S - max) / eps), built in place in one new B x C buffer (large allocations dominate on CPU).
        kernel = torch.sub(scores, shift).div_(epsilon).exp_()
        if weights is not None:
            kernel.masked_fill_(
                ~taking_part[:, None], 0.0
            )  # rows that do not take part: zero mass, junk ignored
        row_mass = row_weight / total_rows.clamp_min(1.0)  # 1/B on participating rows, 0 elsewhere
        row_scale = row_weight  # u
        for _ in range(iterations):
            column_sums = row_scale @ kernel  # (K^T u)_c: each class's current mass
            if distributed:
                torch.distributed.all_reduce(column_sums, group=process_group)
            column_scale = class_mass / column_sums.clamp_min(tiny)  # v: class masses -> prior
            row_sums = kernel @ column_scale  # (K v)_i
            row_scale = row_mass / row_sums.clamp_min(tiny)  # u: pixel masses -> 1/B
        plan = kernel.mul_((row_scale * total_rows)[:, None]).mul_(column_scale[None, :])
    return plan
