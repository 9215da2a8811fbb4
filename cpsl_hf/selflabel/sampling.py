"""Per-image pixel sampling with static output shapes: class-balanced (paper Eq. 9) and uniform (reference code).

Both are vectorised over images and classes (sorts, cumulative sums and scatters; no Python loop, no
GPU-to-CPU sync) and return ``(indices, valid)``: N x num_samples flat pixel indices into ``h * w`` and an
N x num_samples mask that is false only where an image has fewer labelled pixels than ``num_samples``
(those slots hold index 0 and must be ignored).
"""

from __future__ import annotations

import torch

__all__ = ["class_balanced_sample", "uniform_sample"]


def _flatten_labels(labels: torch.Tensor, num_samples: int, name: str) -> torch.Tensor:
    if labels.dim() not in (2, 3):
        raise ValueError(f"{name}: labels must be N x h x w (or N x h*w), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be an integer tensor, got {labels.dtype}")
    if num_samples < 1:
        raise ValueError(f"{name}: num_samples must be positive, got {num_samples}")
    return labels.reshape(labels.shape[0], -1)


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """Rank of every element given the N x P permutation ``order`` that sorts each row (one scatter, no 2nd sort)."""
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _compact(selected: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N x P bool with at most num_samples true per row -> (N x num_samples indices in pixel order, valid)."""
    num_images, num_pixels = selected.shape
    slot = torch.cumsum(selected, dim=1) - 1
    slot = torch.where(selected, slot, torch.full_like(slot, num_samples))  # unselected -> a discarded column
    pixel = torch.arange(num_pixels, device=selected.device).expand(num_images, num_pixels)
    indices = torch.zeros(num_images, num_samples + 1, dtype=torch.long, device=selected.device)
    indices.scatter_(1, slot, pixel)  # selected pixels have distinct slots; collisions only in the discard
    taken = selected.sum(dim=1, keepdim=True)
    valid = torch.arange(num_samples, device=selected.device)[None, :] < taken
    indices = indices[:, :num_samples] * valid
    return indices, valid


def uniform_sample(
    labels: torch.Tensor,
    num_samples: int = 256,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` labelled pixels per image, uniformly without replacement (the reference code's sampling,
    which ignores the class distribution).

    Args:
        labels: N x h x w integer labels, ``ignore_index`` where unlabelled.
        num_samples: M, pixels per image.
        ignore_index: label value never drawn.
        generator: optional ``torch.Generator`` on ``labels.device``.

    Returns:
        ``(indices, valid)``: N x M int64 flat indices (ascending) and N x M bool.
    """
    flat = _flatten_labels(labels, num_samples, "uniform_sample")
    labelled = flat != ignore_index
    keys = torch.rand(flat.shape, generator=generator, device=flat.device)
    keys = torch.where(labelled, keys, torch.full_like(keys, 2.0))  # unlabelled pixels sort last
    rank = _inverse_permutation(torch.argsort(keys, dim=1))
    return _compact(labelled & (rank < num_samples), num_samples)


def class_balanced_sample(
    labels: torch.Tensor,
    num_samples: int = 256,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced pixel sampling (CPSL, Eq. 9) with exactly ``num_samples`` slots per image.

    With ``L_n`` labelled pixels in image n, ``n_c`` of class c, class c gets ``floor(M * n_c / L_n)`` pixels
    and the ``M - sum_c floor(...)`` leftover slots go one each to the classes with the largest remainders
    ``M * n_c mod L_n`` (ties to the smaller class id): the largest-remainder (Hamilton) apportionment, in
    exact integer arithmetic. Pixels are drawn uniformly without replacement within each class. An image with
    ``L_n <= M`` gives all its labelled pixels and ``M - L_n`` invalid slots.

    How (all images and classes at once): one sort by ``class + uniform key`` groups each class's pixels in
    random order; group starts give each pixel its rank within its class and its class size; a second sort
    ranks the classes by remainder for the leftover slots; a pixel is kept when its rank is below its class
    quota; a cumulative sum compacts the kept pixels into the M slots.

    Args:
        labels: N x h x w integer labels (non-negative class ids), ``ignore_index`` where unlabelled.
        num_samples: M, pixels per image.
        ignore_index: label value never drawn.
        generator: optional ``torch.Generator`` on ``labels.device``.
        num_classes: optional C; when given, values outside [0, C) count as ignored and the per-class work
            runs on N x (C + 1) instead of N x h*w (faster; the result is the same for labels in range).

    Returns:
        ``(indices, valid)``: N x M int64 flat pixel indices into ``h * w`` (ascending among valid slots), and
        an N x M bool mask, false only for the slots of images with fewer than M labelled pixels.
    """
    flat = _flatten_labels(labels, num_samples, "class_balanced_sample")
    num_images, num_pixels = flat.shape
    device = flat.device
    labelled = flat != ignore_index
    if num_classes is not None:
        labelled = labelled & (flat >= 0) & (flat < num_classes)
    # Upper bound on the number of groups (classes present + the unlabelled group) per image.
    num_groups = num_pixels if num_classes is None else min(num_pixels, num_classes + 1)

    # 1. Sort by class, randomly within a class; unlabelled pixels last (key +inf).
    keys = torch.rand(flat.shape, generator=generator, device=device, dtype=torch.float64)
    keys = torch.where(labelled, flat.to(torch.float64) + keys, torch.full_like(keys, float("inf")))
    sorted_keys, order = torch.sort(keys, dim=1)
    sorted_class = torch.floor(sorted_keys)  # inf stays inf
    sorted_labelled = torch.isfinite(sorted_keys)

    # 2. Group (= class within image) starts, rank within the group and group sizes.
    position = torch.arange(num_pixels, device=device).expand(num_images, num_pixels)
    is_start = torch.ones_like(sorted_labelled)
    is_start[:, 1:] = sorted_class[:, 1:] != sorted_class[:, :-1]
    start_position = torch.cummax(torch.where(is_start, position, torch.zeros_like(position)), dim=1).values
    rank_in_class = position - start_position
    group = torch.cumsum(is_start, dim=1) - 1  # group id per sorted pixel, < num_groups
    group_size = torch.zeros(num_images, num_groups, dtype=torch.long, device=device)
    group_size.scatter_add_(1, group, sorted_labelled.long())  # per group id; the unlabelled group counts 0

    # 3. Largest-remainder quotas per group, exact integers.
    labelled_count = labelled.sum(dim=1, keepdim=True)  # L_n
    denominator = labelled_count.clamp_min(1)
    floor_quota = (num_samples * group_size) // denominator
    remainder = (num_samples * group_size) % denominator
    leftover = num_samples - floor_quota.sum(dim=1, keepdim=True)  # < number of groups with remainder > 0
    group_exists = group_size > 0
    group_ids = torch.arange(num_groups, device=device).expand(num_images, num_groups)
    # Rank groups by remainder (desc), ties by group id = class order (asc); absent groups last.
    priority = torch.where(group_exists, remainder * num_groups + (num_groups - 1 - group_ids), -1)
    remainder_rank = _inverse_permutation(torch.argsort(priority, dim=1, descending=True, stable=True))
    quota = floor_quota + (remainder_rank < leftover).long()
    quota = torch.where(labelled_count <= num_samples, group_size, quota)  # too few pixels: take them all

    # 4. Keep a pixel when its rank in its class is below the class quota; back to pixel order; compact.
    keep_sorted = sorted_labelled & (rank_in_class < quota.gather(1, group))
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return _compact(keep, num_samples)
