"""The training views of a batch and the warps between them, shared by every stage.

A stage draws its views through :class:`Views` (one ``torch.Generator`` per process, so a resume redraws them
exactly) and moves weak-view quantities onto the strong view with :func:`labels_to_strong_view` and
:func:`maps_to_strong_view`. Resolution helpers (:func:`upsampled`, :func:`resize_mask`,
:func:`downsample_labels`, :func:`cross_entropy_at`) keep every stage's resizing identical.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cpsl_hf.data.protocols import IGNORE_INDEX
from cpsl_hf.data.transforms import (
    GEOMETRIC_OPS,
    RANDAUGMENT_OPS,
    StrongView,
    WeakView,
    strong_augment,
    to_float,
    warp_to_view,
    weak_augment,
)
from cpsl_hf.modeling_cpsl import resize_bilinear
from cpsl_hf.selflabel import masked_cross_entropy

PHOTOMETRIC_OPS = tuple(name for name in RANDAUGMENT_OPS if name not in GEOMETRIC_OPS)
"""The strong view's colour operations (``--source_augment photometric`` applies them to source crops)."""


class Views:
    """Draws the source crop and the target weak / strong views of a batch.

    Args:
        crop_size: (h, w) of every training crop.
        scale_range: random rescale range of the weak view.
        source_augment: ``weak`` (crop, rescale, flip) or ``photometric`` (also the strong view's colours).
        generator: the process's augmentation generator (its state is part of every checkpoint).
    """

    def __init__(self, crop_size, scale_range, source_augment: str, generator: torch.Generator):
        self.crop_size = tuple(crop_size)
        self.scale_range = tuple(scale_range)
        self.source_augment = source_augment
        self.generator = generator

    def source(self, batch: dict[str, Any]) -> WeakView:
        """Source crop: ``WeakView`` with images N x 3 x h x w float in [0, 1] and labels N x h x w int64."""
        view = weak_augment(
            to_float(batch["pixel_values"]),
            batch["labels"],
            crop_size=self.crop_size,
            scale_range=self.scale_range,
            generator=self.generator,
        )
        if self.source_augment == "photometric":
            view.images = strong_augment(
                view.images, generator=self.generator, randaugment_ops=PHOTOMETRIC_OPS, cutout=False
            ).images
        return view

    def target_weak(self, batch: dict[str, Any]) -> WeakView:
        """Target weak view (rescale, crop, flip; no labels) with its recorded geometry (images N x 3 x h x w)."""
        return weak_augment(
            to_float(batch["pixel_values"]),
            None,
            crop_size=self.crop_size,
            scale_range=self.scale_range,
            generator=self.generator,
        )

    def target(self, batch: dict[str, Any]) -> tuple[WeakView, StrongView]:
        """Target weak view and the strong view of that weak crop, each with its recorded geometry."""
        weak = self.target_weak(batch)
        return weak, strong_augment(weak.images, generator=self.generator)


def labels_to_strong_view(
    labels_weak: torch.Tensor, strong: StrongView, size: tuple[int, int], ignore_cutout: bool
) -> torch.Tensor:
    """N x h x w weak-view labels warped onto the strong view (nearest; 255 outside it) at ``size``; with
    ``ignore_cutout``, 255 inside the cutout box, whose pixels the student does not see."""
    labels, _ = warp_to_view(labels_weak, strong.params, size, mode="nearest", fill=IGNORE_INDEX)
    if ignore_cutout:
        labels = labels.masked_fill(resize_mask(strong.cutout_mask, size), IGNORE_INDEX)
    return labels


def maps_to_strong_view(
    maps: torch.Tensor, weak_valid: torch.Tensor, strong: StrongView, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weak-view maps (N x C x h x w float) onto the strong view (bilinear), with where they are defined.

    The weak view's validity travels as one extra channel of the same warp (> 0.5 = valid), so maps and mask
    share one resampling.

    Returns:
        ``(maps N x C x h' x w', valid N x h' x w' bool)``: valid inside the strong view, inside the weak view's
        image and outside the strong view's padding (the cutout box is not excluded here).
    """
    warped, warped_valid = warp_to_view(
        torch.cat([maps, weak_valid[:, None].to(maps.dtype)], dim=1), strong.params, size, mode="bilinear"
    )
    valid = warped_valid & resize_mask(strong.valid_mask, size) & (warped[:, -1] > 0.5)
    return warped[:, :-1], valid


def cross_entropy_at(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE of N x C x h x w logits upsampled (bilinear) to the N x H x W labels; ignore 255; float32; 0 when no
    pixel is labelled (see :func:`cpsl_hf.selflabel.masked_cross_entropy`)."""
    return masked_cross_entropy(upsampled(logits, tuple(labels.shape[-2:])), labels, IGNORE_INDEX)


def upsampled(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x C x h x w float maps resized (bilinear) to ``size``; the same tensor when already that size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return resize_bilinear(maps.float(), size)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x H x W bool -> N x h x w (nearest)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x H x W integer labels -> N x h x w (nearest)."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
