"""Weak and strong views, their geometry, and ClassMix / CutMix, as batched torch operations.

Every function works on a whole batch on whatever device the batch lives on: per-image random parameters
are tensors, resampling is index arithmetic plus one ``gather``, and no function loops over images or pixels
or synchronises with the host. Randomness comes from an optional ``torch.Generator`` (CPU or on the batch's
device) so a seeded generator reproduces a view exactly.

Geometry convention
-------------------
A view stores one affine matrix per image, ``affine`` (N x 2 x 3), that maps *view* coordinates to *source*
coordinates, both normalised the ``align_corners=False`` way: ``u = 2 * x / width - 1`` where ``x`` is the
continuous pixel coordinate (pixel ``j`` covers ``[j, j + 1)``, its centre is ``j + 0.5``), so ``-1`` and ``+1``
are the outer edges of the frame. Normalised coordinates do not depend on resolution, therefore one matrix
serves an image, its label map, and a teacher's probability map at 1/4 or 1/8 of the resolution alike.

* ``weak_augment`` records ``WeakParams.affine``: weak-crop coordinates -> coordinates of the input image.
* ``strong_augment`` records ``StrongParams.affine``: strong-view coordinates -> weak-crop coordinates.
* ``compose(weak.params, strong.params)`` (a matrix product) maps strong-view coordinates -> input image.

``warp_to_view(maps, params, output_size)`` samples ``maps`` (any resolution covering the params' source
frame) at the view's pixel centres; view pixels whose centre falls outside the source frame are "invalid"
(``valid_mask`` False; ``fill``, 255 for label maps). Identity parameters are exact no-ops, and integer crops
and flips are exact copies, for images, probability maps and labels alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .protocols import IGNORE_INDEX  # re-exported: the label value of ignored pixels

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDAUGMENT_OPS",
    "GEOMETRIC_OPS",
    "MixResult",
    "StrongParams",
    "StrongView",
    "ViewGeometry",
    "WeakParams",
    "WeakView",
    "apply_mix_mask",
    "class_mix",
    "compose",
    "cut_mix",
    "identity_params",
    "normalize",
    "strong_augment",
    "to_float",
    "warp_to_view",
    "weak_augment",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# FixMatch's RandAugment pool (cutout is applied separately, always, as in FixMatch).
RANDAUGMENT_OPS = (
    "identity",
    "autocontrast",
    "equalize",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")

# Magnitude ranges of the RandAugment ops (a signed magnitude m in [-1, 1] is drawn per image and op).
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3  # fraction of the view's width / height
MAX_ENHANCE = 0.9  # brightness / color / contrast / sharpness factor 1 + 0.9 m, in [0.1, 1.9]

# Sample positions closer than this (in map pixels) to a pixel centre snap onto it, so that identity, integer
# crops and flips copy values exactly despite float rounding; it is above float32 rounding of coordinates up
# to a few thousand pixels and far below any visible interpolation difference.
_SNAP_PIXELS = 1e-3

_NAME = "cpsl_hf.data.transforms"


# ----------------------------------------------------------------------------------------------------------
# Conversion and normalisation
# ----------------------------------------------------------------------------------------------------------
def to_float(images: Tensor) -> Tensor:
    """uint8 images N x 3 x H x W (any leading shape) -> float32 in [0, 1] (divided by 255)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"{_NAME}.to_float: images must be uint8, got {images.dtype}")
    return images.float().div_(255.0)


def normalize(images: Tensor) -> Tensor:
    """ImageNet-normalise float images ``... x 3 x H x W`` in [0, 1]: ``(x - IMAGENET_MEAN) / IMAGENET_STD``."""
    if not images.is_floating_point():
        raise TypeError(
            f"{_NAME}.normalize: images must be float in [0, 1] (use to_float), got {images.dtype}"
        )
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"{_NAME}.normalize: images must be ... x 3 x H x W, got {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def _float_images(images: Tensor, where: str) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{_NAME}.{where}: images must be N x 3 x H x W, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return to_float(images)
    if not images.is_floating_point():
        raise TypeError(f"{_NAME}.{where}: images must be uint8 or float in [0, 1], got {images.dtype}")
    return images


# ----------------------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------------------
def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32 of ``shape`` on ``device``, drawn from ``generator`` (on its own device)."""
    if generator is None:
        return torch.rand(tuple(shape), device=device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def _uniform(shape, low: float, high: float, generator, device) -> Tensor:
    return low + (high - low) * _rand(shape, generator, device)


# ----------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ViewGeometry:
    """The geometry of a batch of views.

    Attributes:
        affine: N x 2 x 3 float32. Row-vector form ``[u_src, v_src] = affine @ [u_view, v_view, 1]``, both in
            normalised ``align_corners=False`` coordinates (-1 / +1 = outer frame edges, x first).
        source_size: N x 2 int64, (height, width) in pixels of the frame the view was taken from.
        view_size: (height, width) of the view in pixels (the default ``output_size`` of ``warp_to_view``).
    """

    affine: Tensor
    source_size: Tensor
    view_size: tuple[int, int]

    def then(self, inner: ViewGeometry) -> ViewGeometry:
        """``compose(self, inner)``: ``inner`` is a view of this view (e.g. ``weak.params.then(strong.params)``)."""
        return compose(self, inner)

    def to(self, device: torch.device | str):
        """A copy with every tensor moved to ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)


@dataclass
class WeakParams(ViewGeometry):
    """Geometry of a weak view (``affine`` maps weak-crop coords -> input image coords) and its parameters.

    Attributes (per image, N leading):
        scale: N float32, the drawn rescale factor s.
        scaled_size: N x 2 int64, (round(H s), round(W s)): the size the image was rescaled to.
        crop_offset: N x 2 int64, (top, left) of the crop in the rescaled image; negative when the rescaled
            image is smaller than the crop (it then sits inside the crop, the rest is padding: invalid).
        flip: N bool, the crop was mirrored horizontally (after cropping).
    """

    scale: Tensor
    scaled_size: Tensor
    crop_offset: Tensor
    flip: Tensor


@dataclass
class StrongParams(ViewGeometry):
    """Geometry of a strong view (``affine`` maps strong-view coords -> weak-crop coords) and its parameters.

    Attributes (per image, N leading); ops that were not applied hold their identity value:
        brightness, contrast, saturation: N float32 colour-jitter factors (1 = unchanged).
        hue: N float32 hue rotation as a fraction of a full turn (0 = unchanged).
        blur_sigma: N float32 Gaussian blur sigma in pixels (0 = no blur).
        randaugment_ops: N x K int64 indices into ``randaugment_pool`` (K = num_randaugment_ops, distinct).
        randaugment_magnitudes: N x K float32 signed magnitudes in [-1, 1] of those ops.
        rotate_degrees, shear_x, shear_y: N float32 (geometric RandAugment ops, 0 = unchanged).
        translate: N x 2 float32 (x, y) translation as a fraction of the view's width / height.
        cutout_box: N x 4 int64 (top, left, bottom, right), exclusive ends; empty when top == bottom.
        randaugment_pool: the op names the indices refer to.
    """

    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    blur_sigma: Tensor
    randaugment_ops: Tensor
    randaugment_magnitudes: Tensor
    rotate_degrees: Tensor
    shear_x: Tensor
    shear_y: Tensor
    translate: Tensor
    cutout_box: Tensor
    randaugment_pool: tuple[str, ...]


@dataclass
class WeakView:
    """Output of :func:`weak_augment`.

    Attributes:
        images: N x 3 x h x w float in [0, 1] (``image_fill`` where padded).
        labels: N x h x w int64 (255 where padded or ignored), or None when no labels were given.
        params: the recorded :class:`WeakParams`.
        valid_mask: N x h x w bool, True where the crop pixel has a source pixel (not padding).
    """

    images: Tensor
    labels: Tensor | None
    params: WeakParams
    valid_mask: Tensor


@dataclass
class StrongView:
    """Output of :func:`strong_augment`.

    Attributes:
        images: N x 3 x h x w float in [0, 1].
        params: the recorded :class:`StrongParams`.
        cutout_mask: N x h x w bool, True inside the cutout box (pixels replaced by ``fill``).
        valid_mask: N x h x w bool, True where the strong pixel has a source pixel in the weak crop (geometric
            ops can move the frame edge into the view). Cutout does not make pixels invalid.
    """

    images: Tensor
    params: StrongParams
    cutout_mask: Tensor
    valid_mask: Tensor


def _homogeneous(affine: Tensor) -> Tensor:
    """N x 2 x 3 -> N x 3 x 3 with last row [0, 0, 1]."""
    bottom = torch.zeros_like(affine[:, :1])
    bottom[:, 0, 2] = 1.0
    return torch.cat([affine, bottom], dim=1)


def compose(*params: ViewGeometry) -> ViewGeometry:
    """Chain views: ``compose(weak.params, strong.params)`` maps strong-view coords to the weak source image.

    ``params[0]`` is the outermost view (taken from the original image), each next one a view of the
    previous one. The affine is the matrix product ``A_0 @ A_1 @ ...`` (homogeneous), the source size is
    ``params[0].source_size`` and the view size ``params[-1].view_size``.
    """
    if not params:
        raise ValueError(f"{_NAME}.compose: needs at least one ViewGeometry")
    matrix = _homogeneous(params[0].affine.float())
    for inner in params[1:]:
        if inner.affine.shape[0] != matrix.shape[0]:
            raise ValueError(
                f"{_NAME}.compose: batch sizes differ ({matrix.shape[0]} vs {inner.affine.shape[0]})"
            )
        matrix = matrix @ _homogeneous(inner.affine.to(device=matrix.device, dtype=matrix.dtype))
    return ViewGeometry(
        affine=matrix[:, :2].contiguous(), source_size=params[0].source_size, view_size=params[-1].view_size
    )


def identity_params(
    batch_size: int, size: tuple[int, int], device: torch.device | str = "cpu"
) -> ViewGeometry:
    """Identity geometry for ``batch_size`` views of a frame of ``size`` (h, w): warping is an exact no-op."""
    affine = torch.zeros(batch_size, 2, 3, device=device)
    affine[:, 0, 0] = 1.0
    affine[:, 1, 1] = 1.0
    source_size = torch.tensor(size, dtype=torch.long, device=device).expand(batch_size, 2).clone()
    return ViewGeometry(affine=affine, source_size=source_size, view_size=(int(size[0]), int(size[1])))


def _float64_ok(device: torch.device) -> bool:
    return device.type != "mps"


def warp_to_view(
    maps: Tensor,
    params: ViewGeometry | Tensor,
    output_size: tuple[int, int] | None = None,
    mode: str = "bilinear",
    fill: float | int | None = None,
) -> tuple[Tensor, Tensor]:
    """Resample maps that cover the source frame onto the view described by ``params``.

    Args:
        maps: N x C x H' x W' (images, probability maps, any float) or N x H' x W' (label maps, any dtype).
            Any resolution: ``maps`` only has to cover the same frame as the params' source (e.g. a teacher's
            probability map at 1/4 of the image resolution).
        params: a :class:`ViewGeometry` (``WeakParams``, ``StrongParams`` or a ``compose`` of them) or its
            N x 2 x 3 ``affine`` tensor (then ``output_size`` is required).
        output_size: (h, w) of the output grid over the view frame; defaults to ``params.view_size``. A
            smaller grid over the same frame (e.g. h/4 x w/4 for decoder logits) is fine.
        mode: "bilinear" (float maps; edge pixels are replicated inside the frame) or "nearest" (any dtype;
            exact values, ties go to the higher index).
        fill: value of invalid pixels (outside the source frame). Default: 255 for integer maps, 0 for float,
            False for bool.

    Returns:
        (warped, valid_mask): warped N x C x h x w (or N x h x w), same dtype as ``maps``; valid_mask N x h x w
        bool, True where the view pixel's centre lies inside the source frame. The mask depends only on the
        params and ``output_size``, never on the resolution of ``maps``.
    """
    if isinstance(params, Tensor):
        affine = params
        if output_size is None:
            raise ValueError(f"{_NAME}.warp_to_view: output_size is required when params is an affine tensor")
    else:
        affine = params.affine
        output_size = params.view_size if output_size is None else output_size
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"{_NAME}.warp_to_view: mode must be 'bilinear' or 'nearest', got {mode!r}")
    if maps.ndim not in (3, 4):
        raise ValueError(
            f"{_NAME}.warp_to_view: maps must be N x C x H x W or N x H x W, got {tuple(maps.shape)}"
        )
    if affine.ndim != 3 or affine.shape[1:] != (2, 3) or affine.shape[0] != maps.shape[0]:
        raise ValueError(
            f"{_NAME}.warp_to_view: params.affine must be N x 2 x 3 with N = maps.shape[0] = {maps.shape[0]}, "
            f"got {tuple(affine.shape)}"
        )
    if mode == "bilinear" and not maps.is_floating_point():
        raise ValueError(
            f"{_NAME}.warp_to_view: mode='bilinear' needs float maps, got {maps.dtype}; use mode='nearest' "
            "for label maps"
        )
    out_h, out_w = int(output_size[0]), int(output_size[1])
    if fill is None:
        fill = False if maps.dtype == torch.bool else (0.0 if maps.is_floating_point() else IGNORE_INDEX)

    squeeze = maps.ndim == 3
    batched = maps.unsqueeze(1) if squeeze else maps
    n, channels, src_h, src_w = batched.shape
    device = batched.device
    matrix = affine.to(device=device, dtype=torch.float32)

    # Validity, in normalised coordinates (resolution independent).
    u_view = (torch.arange(out_w, device=device, dtype=torch.float32) * 2 + 1) / out_w - 1
    v_view = (torch.arange(out_h, device=device, dtype=torch.float32) * 2 + 1) / out_h - 1
    u_src = _affine_plane(matrix[:, 0], u_view, v_view, 0.0)
    v_src = _affine_plane(matrix[:, 1], u_view, v_view, 0.0)
    valid = (u_src.abs() <= 1) & (v_src.abs() <= 1)

    # Sample positions in map pixels: with A = [[a, b, c], [d, e, f]] and u = 2 x / w - 1, the map coordinate is
    # x_map = (u_src + 1) W / 2 = (a W / w) x + (b W / h) y + W / 2 (c + 1 - a - b), likewise y_map. The N x 2 x 3
    # pixel matrix is computed in float64 (exact for identity and integer crops) and applied to view pixel
    # centres (j + 0.5); map pixel centres sit at x_map = k + 0.5, nearest picks floor(x_map).
    wide = affine.to(device=device, dtype=torch.float64 if _float64_ok(device) else torch.float32)
    pixel_rows = [
        torch.stack(
            [
                wide[:, row, 0] * (size / out_w),
                wide[:, row, 1] * (size / out_h),
                (wide[:, row, 2] + 1 - wide[:, row, 0] - wide[:, row, 1]) * (size / 2),
            ],
            dim=1,
        ).float()
        for row, size in ((0, src_w), (1, src_h))
    ]
    x_view = torch.arange(out_w, device=device, dtype=torch.float32) + 0.5
    y_view = torch.arange(out_h, device=device, dtype=torch.float32) + 0.5
    shift = 0.0 if mode == "nearest" else -0.5
    x = _snap(_affine_plane(pixel_rows[0], x_view, y_view, shift))
    y = _snap(_affine_plane(pixel_rows[1], x_view, y_view, shift))

    flat = batched.reshape(n, channels, src_h * src_w)
    if mode == "nearest":
        # the nearest map pixel is floor(x_map); ties (snapped) go to the higher index
        ix = x.floor().clamp_(0, src_w - 1).long()
        iy = y.floor().clamp_(0, src_h - 1).long()
        index = (iy * src_w + ix).reshape(n, 1, out_h * out_w).expand(n, channels, out_h * out_w)
        warped = torch.gather(flat, 2, index).reshape(n, channels, out_h, out_w)
    else:
        x0, y0 = x.floor(), y.floor()
        fx = (x - x0).to(batched.dtype).reshape(n, 1, out_h * out_w)
        fy = (y - y0).to(batched.dtype).reshape(n, 1, out_h * out_w)
        x0, y0 = x0.long(), y0.long()
        ix0, ix1 = x0.clamp(0, src_w - 1), (x0 + 1).clamp_(0, src_w - 1)
        iy0, iy1 = y0.clamp(0, src_h - 1), (y0 + 1).clamp_(0, src_h - 1)
        corners = torch.stack([iy0 * src_w + ix0, iy0 * src_w + ix1, iy1 * src_w + ix0, iy1 * src_w + ix1], 1)
        index = corners.reshape(n, 1, 4 * out_h * out_w).expand(n, channels, 4 * out_h * out_w)
        values = torch.gather(flat, 2, index).reshape(n, channels, 4, out_h * out_w)
        top = values[:, :, 0] + fx * (values[:, :, 1] - values[:, :, 0])
        bottom = values[:, :, 2] + fx * (values[:, :, 3] - values[:, :, 2])
        # written as a + f (b - a): an exact copy of a when f == 0
        warped = (top + fy * (bottom - top)).reshape(n, channels, out_h, out_w)

    warped = torch.where(valid[:, None], warped, warped.new_full((), fill))
    return (warped[:, 0] if squeeze else warped), valid


def _affine_plane(row: Tensor, x: Tensor, y: Tensor, shift: float) -> Tensor:
    """``row[:, 0] x + row[:, 1] y + row[:, 2] + shift`` on the N x len(y) x len(x) grid (two broadcast terms,
    one full-size add)."""
    columns = row[:, 0, None, None] * x + (row[:, 2, None, None] + shift)  # N x 1 x w
    rows = row[:, 1, None, None] * y[:, None]  # N x h x 1
    return columns + rows


def _snap(coordinates: Tensor) -> Tensor:
    rounded = coordinates.round()
    return torch.where((coordinates - rounded).abs() < _SNAP_PIXELS, rounded, coordinates)


# ----------------------------------------------------------------------------------------------------------
# Weak view
# ----------------------------------------------------------------------------------------------------------
def _random_offset(scaled: Tensor, crop: int, generator, device) -> Tensor:
    """Integer offset of a crop of size ``crop`` in a length ``scaled`` (N int64), uniform over all positions;
    negative (the image sits inside the crop) when ``scaled < crop``."""
    low = torch.clamp(scaled - crop, max=0)
    high = torch.clamp(scaled - crop, min=0)
    draw = (_rand(scaled.shape, generator, device) * (high - low + 1).float()).floor().long()
    return torch.minimum(low + draw, high)


def weak_augment(
    images: Tensor,
    labels: Tensor | None = None,
    crop_size: tuple[int, int] | None = None,
    scale_range: tuple[float, float] = (0.5, 1.5),
    flip: bool = True,
    generator: torch.Generator | None = None,
    image_fill: float = 0.0,
) -> WeakView:
    """Random rescale, random crop (padding when too small) and horizontal flip of a batch.

    Each image is rescaled by s ~ U(scale_range) to (round(H s), round(W s)), a ``crop_size`` window is
    taken at a uniformly random integer offset (if the rescaled image is smaller than the crop it is placed
    at a random position inside the crop; the rest is padding: ``image_fill`` in the images, 255 in the
    labels, False in ``valid_mask``), and the crop is mirrored with probability 0.5 when ``flip``. Images
    are resampled bilinearly, labels with nearest, both through :func:`warp_to_view` with the recorded
    params, so warping any map of the full images with ``view.params`` reproduces the view exactly.

    Args:
        images: N x 3 x H x W uint8 or float in [0, 1].
        labels: optional N x H' x W' integer label map of the same frame (usually H' x W' = H x W).
        crop_size: (h, w) of the output; None keeps (H, W).
        scale_range: (low, high) of the uniform rescale factor; (1, 1) disables rescaling.
        flip: random horizontal flip with probability 0.5.
        generator: optional torch.Generator (CPU or on the images' device).
        image_fill: value of padded image pixels.

    Returns:
        :class:`WeakView` with images N x 3 x h x w float, labels N x h x w int64 (or None), params, valid_mask.
    """
    images = _float_images(images, "weak_augment")
    n, _, height, width = images.shape
    device = images.device
    crop_h, crop_w = (height, width) if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
    if crop_h <= 0 or crop_w <= 0:
        raise ValueError(f"{_NAME}.weak_augment: crop_size must be positive, got {crop_size}")
    low, high = float(scale_range[0]), float(scale_range[1])
    if not 0 < low <= high:
        raise ValueError(f"{_NAME}.weak_augment: scale_range must satisfy 0 < low <= high, got {scale_range}")
    if labels is not None:
        if labels.ndim != 3 or labels.shape[0] != n or labels.is_floating_point():
            raise ValueError(
                f"{_NAME}.weak_augment: labels must be an integer N x H x W map with N = {n}, got "
                f"{tuple(labels.shape)} {labels.dtype}"
            )

    scale = _uniform((n,), low, high, generator, device)
    scaled_h = (scale * height).round().long().clamp_(min=1)
    scaled_w = (scale * width).round().long().clamp_(min=1)
    top = _random_offset(scaled_h, crop_h, generator, device)
    left = _random_offset(scaled_w, crop_w, generator, device)
    flipped = (
        (_rand((n,), generator, device) < 0.5) if flip else torch.zeros(n, dtype=torch.bool, device=device)
    )

    # u_src = sign * (w / W_s) u_view + (w + 2 left) / W_s - 1  (and the same for y without the sign)
    sign = 1.0 - 2.0 * flipped.float()
    affine = torch.zeros(n, 2, 3, device=device)
    affine[:, 0, 0] = sign * crop_w / scaled_w.float()
    affine[:, 0, 2] = (crop_w + 2 * left).float() / scaled_w.float() - 1
    affine[:, 1, 1] = crop_h / scaled_h.float()
    affine[:, 1, 2] = (crop_h + 2 * top).float() / scaled_h.float() - 1
    params = WeakParams(
        affine=affine,
        source_size=torch.tensor([height, width], dtype=torch.long, device=device).expand(n, 2).clone(),
        view_size=(crop_h, crop_w),
        scale=scale,
        scaled_size=torch.stack([scaled_h, scaled_w], 1),
        crop_offset=torch.stack([top, left], 1),
        flip=flipped,
    )
    view_images, valid = warp_to_view(images, params, mode="bilinear", fill=image_fill)
    view_labels = None
    if labels is not None:
        view_labels, _ = warp_to_view(labels.long(), params, mode="nearest", fill=IGNORE_INDEX)
    return WeakView(images=view_images, labels=view_labels, params=params, valid_mask=valid)


# ----------------------------------------------------------------------------------------------------------
# Photometric operations (batched, per-image parameters as N tensors; all keep [0, 1])
# ----------------------------------------------------------------------------------------------------------
def _per_image(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _where_applied(on: Tensor, operation, images: Tensor, *per_image: Tensor) -> Tensor:
    """``operation(images, *per_image)`` for the images where ``on`` (N bool), the images themselves elsewhere.

    Every operation here treats each image on its own, so on the CPU it runs on the selected images only
    (:func:`_where_applied_to_selected`: a RandAugment op is drawn for 2 of 14 images, and computing each for all
    of them was most of the strong view's time); on other devices on the whole batch, ``torch.where`` picking
    (:func:`_where_applied_to_batch`: selecting would be a host synchronisation).

    Args:
        on: N bool. images: N x 3 x h x w float. per_image: tensors with N rows (the operation's parameters).
    """
    if images.device.type == "cpu":
        return _where_applied_to_selected(on, operation, images, *per_image)
    return _where_applied_to_batch(on, operation, images, *per_image)


def _where_applied_to_selected(on: Tensor, operation, images: Tensor, *per_image: Tensor) -> Tensor:
    selected = on.nonzero().flatten()
    if selected.numel() == 0:
        return images
    changed = operation(images[selected], *(values[selected] for values in per_image))
    return images.index_copy(0, selected, changed)


def _where_applied_to_batch(on: Tensor, operation, images: Tensor, *per_image: Tensor) -> Tensor:
    return torch.where(_per_image(on), operation(images, *per_image), images)


def _grayscale(images: Tensor) -> Tensor:
    """N x 3 x h x w -> N x 1 x h x w luma (ITU-R 601-2, as PIL / torchvision)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _blend(degenerate: Tensor, images: Tensor, factor: Tensor) -> Tensor:
    """``degenerate + factor (images - degenerate)`` clamped to [0, 1]; factor N (1 = unchanged)."""
    return (degenerate + _per_image(factor) * (images - degenerate)).clamp_(0, 1)


def _adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    return (images * _per_image(factor)).clamp_(0, 1)


def _adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    mean = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(mean, images, factor)


def _adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    return _blend(_grayscale(images), images, factor)


_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
# inverted once here (never per step: torch.linalg.inv on a GPU checks for errors on the host)
_YIQ_TO_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)).tolist()))


def _adjust_hue(images: Tensor, turns: Tensor) -> Tensor:
    """Rotate the chroma plane of YIQ by ``turns`` (N, fraction of a full turn); a smooth hue shift."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float32, device=images.device)
    to_rgb = torch.tensor(_YIQ_TO_RGB, dtype=torch.float32, device=images.device)
    angle = 2 * math.pi * turns.float()
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(turns.shape[0], 3, 3, device=images.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    matrix = (to_rgb @ rotation @ to_yiq).to(images.dtype)
    return torch.einsum("nij,njhw->nihw", matrix, images).clamp_(0, 1)


def _gaussian_blur(images: Tensor, sigma: Tensor, max_sigma: float) -> Tensor:
    """Separable Gaussian blur with a per-image sigma (N), kernel 2 ceil(3 max_sigma) + 1, edges replicated."""
    n, c, h, w = images.shape
    radius = max(1, math.ceil(3 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma.float().clamp(min=1e-3)[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(images.dtype)  # N x K
    kernel = kernel.repeat_interleave(c, dim=0)  # (N c) x K
    flat = images.reshape(1, n * c, h, w)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.pad(flat, (0, 0, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def _autocontrast(images: Tensor) -> Tensor:
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    spread = high - low
    stretched = (images - low) / torch.where(spread > 0, spread, torch.ones_like(spread))
    return torch.where(spread > 0, stretched, images).clamp_(0, 1)


def _equalize(images: Tensor) -> Tensor:
    """PIL's ImageOps.equalize per image and channel on the 8-bit quantised values (batched histograms)."""
    n, c, h, w = images.shape
    levels = (images * 255).round_().clamp_(0, 255).long().reshape(n * c, h * w)
    histogram = torch.zeros(n * c, 256, dtype=torch.long, device=images.device)
    histogram.scatter_add_(1, levels, torch.ones_like(levels))
    bins = torch.arange(256, device=images.device)
    last_bin = (bins * (histogram > 0)).amax(dim=1, keepdim=True)
    step = (histogram.sum(1, keepdim=True) - histogram.gather(1, last_bin)) // 255
    before = histogram.cumsum(1) - histogram
    lut = ((before + step // 2) // step.clamp(min=1)).clamp_(max=255)
    equalized = lut.gather(1, levels).to(images.dtype) / 255
    out = torch.where(step > 0, equalized, images.reshape(n * c, h * w))
    return out.reshape(n, c, h, w)


def _posterize(images: Tensor, bits: Tensor) -> Tensor:
    """Keep the top ``bits`` (N int64, 1..8) bits of the 8-bit quantised values."""
    levels = (images * 255).round_().clamp_(0, 255).long()
    mask = (255 << (8 - bits)) & 255
    return (levels & _per_image(mask)).to(images.dtype) / 255


def _solarize(images: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(images >= _per_image(threshold), 1 - images, images)


def _sharpness(images: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (edge pixels replicated)."""
    n, c, h, w = images.shape
    smooth = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=images.device) / 13
    weight = smooth.to(images.dtype).expand(c, 1, 3, 3)
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    degenerate = F.conv2d(padded, weight, groups=c)
    return _blend(degenerate, images, factor)


def _geometric_affine(
    rotate_degrees: Tensor, shear_x: Tensor, shear_y: Tensor, translate: Tensor, size: tuple[int, int]
) -> Tensor:
    """N x 2 x 3 normalised affine (strong view -> weak crop) of rotate @ shear_x @ shear_y about the centre,
    then translate (fractions of the size), built in pixel units so rotations are not distorted by aspect."""
    height, width = size
    n = rotate_degrees.shape[0]
    device = rotate_degrees.device
    angle = torch.deg2rad(rotate_degrees.float())
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    eye = torch.eye(2, device=device).expand(n, 2, 2)
    shear_x_matrix = eye.clone()
    shear_x_matrix[:, 0, 1] = shear_x.float()
    shear_y_matrix = eye.clone()
    shear_y_matrix[:, 1, 0] = shear_y.float()
    pixel_linear = rotation @ shear_x_matrix @ shear_y_matrix
    half = torch.tensor([width / 2.0, height / 2.0], device=device)
    linear = pixel_linear * half[None, None, :] / half[None, :, None]  # D^-1 M D, D = diag(w/2, h/2)
    offset = 2 * translate.float()  # D^-1 (t * size) = 2 t
    return torch.cat([linear, offset[:, :, None]], dim=2)


# ----------------------------------------------------------------------------------------------------------
# Strong view
# ----------------------------------------------------------------------------------------------------------
def strong_augment(
    images: Tensor,
    generator: torch.Generator | None = None,
    color_jitter: float = 0.4,
    hue: float = 0.1,
    color_jitter_p: float = 0.8,
    blur: bool = True,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    num_randaugment_ops: int = 2,
    randaugment_ops: Sequence[str] = RANDAUGMENT_OPS,
    cutout: bool = True,
    cutout_p: float = 1.0,
    cutout_size: tuple[float, float] = (0.1, 0.5),
    fill: float = 0.5,
) -> StrongView:
    """Strong view of a batch of (weak-crop) images: photometric ops, geometric RandAugment ops, cutout.

    In order: colour jitter (brightness, contrast, saturation factors U[1 - s, 1 + s] with s =
    ``color_jitter``, hue shift U[-hue, hue] turns; applied with probability ``color_jitter_p``), the
    photometric RandAugment ops, Gaussian blur (sigma U(blur_sigma), probability ``blur_p``), one resampling
    for the geometric RandAugment ops (rotate +-30 deg, shear +-0.3, translate +-0.3 of the size; pixels
    pulled from outside the weak crop become ``fill`` and invalid), then cutout (a box with sides
    U(cutout_size) of the view's height / width, random centre, clipped at the border, filled with ``fill``).

    Each image draws ``num_randaugment_ops`` distinct ops from ``randaugment_ops`` (FixMatch's pool by
    default), each with a signed magnitude m ~ U[-1, 1]: brightness / color / contrast / sharpness factor
    1 + 0.9 m, posterize to 8 - floor(4 |m| + 0.5) bits, solarize threshold 1 - |m|, rotate 30 m degrees,
    shear 0.3 m, translate 0.3 m. Photometric ops run in pool order. Pass ``randaugment_ops`` without the
    names in :data:`GEOMETRIC_OPS` for a purely photometric strong view.

    Args:
        images: N x 3 x h x w uint8 or float in [0, 1] (normally ``weak_view.images``).
        generator: optional torch.Generator (CPU or on the images' device).

    Returns:
        :class:`StrongView`; ``params.affine`` maps strong-view coordinates to weak-crop coordinates, so
        ``warp_to_view(p_w, strong.params, output_size)`` brings the teacher's weak-view probabilities onto
        the strong view and ``compose(weak.params, strong.params)`` maps the full image onto it.
    """
    images = _float_images(images, "strong_augment")
    n, _, height, width = images.shape
    device = images.device
    pool = tuple(randaugment_ops)
    unknown = [name for name in pool if name not in RANDAUGMENT_OPS]
    if unknown or len(set(pool)) != len(pool):
        raise ValueError(
            f"{_NAME}.strong_augment: randaugment_ops must be distinct names from {RANDAUGMENT_OPS}, got {pool}"
        )
    if not 0 <= num_randaugment_ops <= len(pool):
        raise ValueError(
            f"{_NAME}.strong_augment: num_randaugment_ops must be in [0, {len(pool)}] for this pool, "
            f"got {num_randaugment_ops}"
        )
    if not 0 < blur_sigma[0] <= blur_sigma[1]:
        raise ValueError(f"{_NAME}.strong_augment: blur_sigma must satisfy 0 < low <= high, got {blur_sigma}")
    ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)

    # Every random number is drawn up front, in a fixed order, whatever the options (reproducible streams).
    jitter_on = _rand((n,), generator, device) < color_jitter_p
    jitter_factors = _uniform((n, 3), 1 - color_jitter, 1 + color_jitter, generator, device).clamp_(min=0)
    hue_turns = _uniform((n,), -hue, hue, generator, device)
    blur_on = (_rand((n,), generator, device) < blur_p) & blur
    sigma = _uniform((n,), blur_sigma[0], blur_sigma[1], generator, device)
    op_keys = _rand((n, max(len(pool), 1)), generator, device)
    op_magnitudes = _uniform((n, max(len(pool), 1)), -1.0, 1.0, generator, device)
    cutout_on = (_rand((n,), generator, device) < cutout_p) & cutout
    cutout_draws = _rand((n, 4), generator, device)

    # Colour jitter.
    brightness = torch.where(jitter_on, jitter_factors[:, 0], ones)
    contrast = torch.where(jitter_on, jitter_factors[:, 1], ones)
    saturation = torch.where(jitter_on, jitter_factors[:, 2], ones)
    hue_turns = torch.where(jitter_on, hue_turns, zeros)
    jittered = _adjust_hue(
        _adjust_saturation(_adjust_contrast(_adjust_brightness(images, brightness), contrast), saturation),
        hue_turns,
    )
    out = torch.where(_per_image(jitter_on), jittered, images)

    # RandAugment: K distinct ops per image (the K smallest random keys).
    chosen = op_keys.argsort(dim=1)[:, :num_randaugment_ops]
    selected = torch.zeros(n, op_keys.shape[1], dtype=torch.bool, device=device)
    selected.scatter_(1, chosen, True)
    chosen_magnitudes = op_magnitudes.gather(1, chosen)

    def op_state(name: str) -> tuple[Tensor, Tensor]:
        if name not in pool:
            return torch.zeros(n, dtype=torch.bool, device=device), zeros
        k = pool.index(name)
        return selected[:, k], torch.where(selected[:, k], op_magnitudes[:, k], zeros)

    for name in pool:
        if name in GEOMETRIC_OPS or name == "identity":
            continue
        on, magnitude = op_state(name)
        if name == "autocontrast":
            out = _where_applied(on, _autocontrast, out)
        elif name == "equalize":
            out = _where_applied(on, _equalize, out)
        elif name == "brightness":
            out = _where_applied(on, _adjust_brightness, out, 1 + MAX_ENHANCE * magnitude)
        elif name == "color":
            out = _where_applied(on, _adjust_saturation, out, 1 + MAX_ENHANCE * magnitude)
        elif name == "contrast":
            out = _where_applied(on, _adjust_contrast, out, 1 + MAX_ENHANCE * magnitude)
        elif name == "sharpness":
            out = _where_applied(on, _sharpness, out, 1 + MAX_ENHANCE * magnitude)
        elif name == "posterize":
            out = _where_applied(on, _posterize, out, 8 - (4 * magnitude.abs() + 0.5).floor().long())
        else:  # solarize
            out = _where_applied(on, _solarize, out, 1 - magnitude.abs())

    # Gaussian blur.
    if blur:
        out = _where_applied(blur_on, lambda chosen, s: _gaussian_blur(chosen, s, blur_sigma[1]), out, sigma)
    blur_sigma_used = torch.where(blur_on, sigma, zeros)

    # Geometric ops: one affine, one resampling (identity for images without geometric ops: an exact copy).
    rotate_degrees = MAX_ROTATE_DEGREES * op_state("rotate")[1]
    shear_x = MAX_SHEAR * op_state("shear_x")[1]
    shear_y = MAX_SHEAR * op_state("shear_y")[1]
    translate = MAX_TRANSLATE * torch.stack([op_state("translate_x")[1], op_state("translate_y")[1]], 1)
    affine = _geometric_affine(rotate_degrees, shear_x, shear_y, translate, (height, width))
    params_geometry = ViewGeometry(
        affine=affine,
        source_size=torch.tensor([height, width], dtype=torch.long, device=device).expand(n, 2).clone(),
        view_size=(height, width),
    )
    if any(name in GEOMETRIC_OPS for name in pool) and num_randaugment_ops > 0:
        out, valid = warp_to_view(out, params_geometry, mode="bilinear", fill=fill)
    else:
        valid = torch.ones(n, height, width, dtype=torch.bool, device=device)

    # Cutout.
    box_h = (_lerp(cutout_draws[:, 0], cutout_size) * height).round().long()
    box_w = (_lerp(cutout_draws[:, 1], cutout_size) * width).round().long()
    centre_y = (cutout_draws[:, 2] * height).floor().long()
    centre_x = (cutout_draws[:, 3] * width).floor().long()
    box_h = torch.where(cutout_on, box_h, torch.zeros_like(box_h))
    top = (centre_y - box_h // 2).clamp(0, height)
    bottom = (centre_y - box_h // 2 + box_h).clamp(0, height)
    left = (centre_x - box_w // 2).clamp(0, width)
    right = (centre_x - box_w // 2 + box_w).clamp(0, width)
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    cutout_mask = (
        (rows >= top.view(n, 1, 1))
        & (rows < bottom.view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < right.view(n, 1, 1))
    )
    out = torch.where(cutout_mask[:, None], torch.tensor(fill, dtype=out.dtype, device=device), out)

    params = StrongParams(
        affine=params_geometry.affine,
        source_size=params_geometry.source_size,
        view_size=params_geometry.view_size,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue=hue_turns,
        blur_sigma=blur_sigma_used,
        randaugment_ops=chosen,
        randaugment_magnitudes=chosen_magnitudes,
        rotate_degrees=rotate_degrees,
        shear_x=shear_x,
        shear_y=shear_y,
        translate=translate,
        cutout_box=torch.stack([top, left, bottom, right], 1),
        randaugment_pool=pool,
    )
    return StrongView(images=out, params=params, cutout_mask=cutout_mask, valid_mask=valid)


def _lerp(fraction: Tensor, bounds: tuple[float, float]) -> Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * fraction


# ----------------------------------------------------------------------------------------------------------
# ClassMix / CutMix
# ----------------------------------------------------------------------------------------------------------
@dataclass
class MixResult:
    """Output of :func:`class_mix` / :func:`cut_mix`.

    Attributes:
        images: N x 3 x H x W, ``images_a`` where ``mask`` else ``images_b`` (dtype of the inputs).
        labels: N x H x W int64, ``labels_a`` where ``mask`` else ``labels_b``.
        mask: N x H x W bool, True where the pixel comes from ``a`` (e.g. the source image pasted in).
    """

    images: Tensor
    labels: Tensor
    mask: Tensor


def apply_mix_mask(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Mix any further maps with a mask from :func:`class_mix` / :func:`cut_mix`: ``a`` where mask else ``b``.

    ``a`` and ``b``: N x H x W or N x C x H x W (same shape), mask N x H x W bool.
    """
    if a.shape != b.shape or a.shape[0] != mask.shape[0] or a.shape[-2:] != mask.shape[-2:]:
        raise ValueError(
            f"{_NAME}.apply_mix_mask: a {tuple(a.shape)} and b {tuple(b.shape)} must share a shape ending in "
            f"the mask's N x H x W {tuple(mask.shape)}"
        )
    return torch.where(mask if a.ndim == 3 else mask[:, None], a, b)


def _check_mix_inputs(images_a, labels_a, images_b, labels_b, where: str) -> None:
    if images_a.ndim != 4 or images_a.shape != images_b.shape:
        raise ValueError(
            f"{_NAME}.{where}: images_a {tuple(images_a.shape)} and images_b {tuple(images_b.shape)} must be "
            "N x 3 x H x W of the same shape"
        )
    expected = (images_a.shape[0], *images_a.shape[2:])
    if tuple(labels_a.shape) != expected or tuple(labels_b.shape) != expected:
        raise ValueError(
            f"{_NAME}.{where}: labels_a {tuple(labels_a.shape)} and labels_b {tuple(labels_b.shape)} must be "
            f"N x H x W = {expected}"
        )
    if labels_a.is_floating_point() or labels_b.is_floating_point():
        raise TypeError(f"{_NAME}.{where}: labels must be integer tensors")


def class_mix(
    images_a: Tensor,
    labels_a: Tensor,
    images_b: Tensor,
    labels_b: Tensor,
    generator: torch.Generator | None = None,
    p: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> MixResult:
    """ClassMix: paste the pixels of half of the classes present in ``labels_a`` onto ``b``.

    Per image, ceil(k / 2) of the k classes present in ``labels_a`` (``ignore_index`` excluded) are chosen
    uniformly at random; the mask is True on their pixels (applied with probability ``p``, else all False).
    Labels must lie in [0, 255] (train ids and 255); batched via a 256-bin presence table, no host syncs.

    Args:
        images_a, images_b: N x 3 x H x W (any dtype, same shape). labels_a, labels_b: N x H x W integer.
        generator: optional torch.Generator.

    Returns:
        :class:`MixResult` (mask True = from ``a``).
    """
    _check_mix_inputs(images_a, labels_a, images_b, labels_b, "class_mix")
    n = images_a.shape[0]
    device = images_a.device
    flat = labels_a.reshape(n, -1).long().clamp(0, 255)
    present = torch.zeros(n, 256, dtype=torch.bool, device=device)
    present.scatter_(1, flat, True)
    if 0 <= ignore_index < 256:
        present[:, ignore_index] = False
    keys = _rand((n, 256), generator, device)
    apply = _rand((n,), generator, device) < p
    rank = torch.where(present, keys, keys + 2).argsort(dim=1).argsort(dim=1)  # present classes rank first
    count = present.sum(1, keepdim=True)
    chosen = present & (rank < (count + 1) // 2) & apply[:, None]
    mask = chosen.gather(1, flat).reshape(labels_a.shape)
    return MixResult(
        images=apply_mix_mask(mask, images_a, images_b),
        labels=torch.where(mask, labels_a.long(), labels_b.long()),
        mask=mask,
    )


def cut_mix(
    images_a: Tensor,
    labels_a: Tensor,
    images_b: Tensor,
    labels_b: Tensor,
    generator: torch.Generator | None = None,
    p: float = 0.5,
    area: float = 0.5,
) -> MixResult:
    """CutMix (reference: p = 0.5, half the area): paste a box of ``a`` onto ``b``.

    Per image, with probability ``p``, a box of round(H sqrt(area)) x round(W sqrt(area)) pixels at a uniformly
    random position inside the image is taken from ``a``; elsewhere (and for images not mixed) ``b`` is kept.

    Args:
        images_a, images_b: N x 3 x H x W (same shape). labels_a, labels_b: N x H x W integer.
        generator: optional torch.Generator.

    Returns:
        :class:`MixResult` (mask True = from ``a``).
    """
    _check_mix_inputs(images_a, labels_a, images_b, labels_b, "cut_mix")
    if not 0 <= area <= 1:
        raise ValueError(f"{_NAME}.cut_mix: area must be in [0, 1], got {area}")
    n, _, height, width = images_a.shape
    device = images_a.device
    box_h, box_w = round(height * math.sqrt(area)), round(width * math.sqrt(area))
    draws = _rand((n, 3), generator, device)
    apply = draws[:, 0] < p
    top = (draws[:, 1] * (height - box_h + 1)).floor().long().clamp(max=height - box_h)
    left = (draws[:, 2] * (width - box_w + 1)).floor().long().clamp(max=width - box_w)
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    top, left = top.view(n, 1, 1), left.view(n, 1, 1)
    mask = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w) & apply.view(n, 1, 1)
    return MixResult(
        images=apply_mix_mask(mask, images_a, images_b),
        labels=torch.where(mask, labels_a.long(), labels_b.long()),
        mask=mask,
    )
