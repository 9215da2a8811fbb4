"""Tests of cpsl_hf.data.transforms: view geometry, exact label warping, strong ops, ClassMix / CutMix."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpsl_hf.data.transforms import (
    GEOMETRIC_OPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDAUGMENT_OPS,
    class_mix,
    compose,
    cut_mix,
    identity_params,
    normalize,
    strong_augment,
    to_float,
    warp_to_view,
    weak_augment,
)

PHOTOMETRIC_OPS = tuple(name for name in RANDAUGMENT_OPS if name not in GEOMETRIC_OPS)


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _smooth_maps(n, channels, size, seed=0):
    """Smooth random probability maps N x C x H x W (softmax of upsampled coarse noise)."""
    coarse = torch.randn(n, channels, 4, 6, generator=_generator(seed)) * 3
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).softmax(1)


def _reference_weak_labels(labels, params):
    """Independent per-image reference of the weak view's labels, from the recorded scale/crop/flip.

    Nearest rescale (source pixel floor((c + 0.5) * W / W_s), ties upward, in float64), then the crop at the
    recorded offset with 255 padding, then the flip.
    """
    n, height, width = labels.shape
    crop_h, crop_w = params.view_size
    out = torch.full((n, crop_h, crop_w), 255, dtype=torch.long)
    for i in range(n):
        scaled_h, scaled_w = params.scaled_size[i].tolist()
        top, left = params.crop_offset[i].tolist()
        rows = np.arange(crop_h) + top  # rows of the rescaled image
        cols = np.arange(crop_w) + left
        src_rows = np.floor((rows + 0.5) * height / scaled_h + 1e-9).astype(np.int64)
        src_cols = np.floor((cols + 0.5) * width / scaled_w + 1e-9).astype(np.int64)
        row_ok = (rows >= 0) & (rows < scaled_h)
        col_ok = (cols >= 0) & (cols < scaled_w)
        crop = labels[i][np.clip(src_rows, 0, height - 1)][:, np.clip(src_cols, 0, width - 1)]
        ok = torch.from_numpy(row_ok[:, None] & col_ok[None, :])
        crop = torch.where(ok, crop, torch.full_like(crop, 255))
        out[i] = crop.flip(-1) if bool(params.flip[i]) else crop
    return out


def _reference_weak_images(images, params):
    """Per-image reference of the weak images: F.interpolate (bilinear) to the scaled size, crop, flip."""
    n = images.shape[0]
    crop_h, crop_w = params.view_size
    out = torch.zeros(n, 3, crop_h, crop_w)
    for i in range(n):
        scaled_h, scaled_w = params.scaled_size[i].tolist()
        top, left = params.crop_offset[i].tolist()
        scaled = F.interpolate(
            images[i : i + 1], size=(scaled_h, scaled_w), mode="bilinear", align_corners=False
        )
        canvas = torch.zeros(1, 3, scaled_h + 2 * crop_h, scaled_w + 2 * crop_w)
        canvas[:, :, crop_h : crop_h + scaled_h, crop_w : crop_w + scaled_w] = scaled
        crop = canvas[0, :, crop_h + top : 2 * crop_h + top, crop_w + left : 2 * crop_w + left]
        out[i] = crop.flip(-1) if bool(params.flip[i]) else crop
    return out


# ------------------------------------------------------------------------------------------------ basics
def test_to_float_and_normalize_match_the_formula():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=_generator())
    floats = to_float(images)
    assert floats.dtype == torch.float32
    assert torch.equal(floats, images.double().div(255).float())
    expected = (floats - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normalize(floats), expected, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        to_float(floats)
    with pytest.raises(TypeError, match="to_float"):
        normalize(images)


# ------------------------------------------------------------------------------------------------ identity
@pytest.mark.parametrize("size", [(8, 8), (7, 13), (33, 17)])
def test_identity_params_are_exact_no_ops(size):
    n = 3
    params = identity_params(n, size)
    images = torch.rand(n, 3, *size, generator=_generator(1))
    probabilities = torch.rand(n, 19, *size, generator=_generator(2)).softmax(1).double()
    labels = torch.randint(0, 19, (n, *size), generator=_generator(3))
    labels[:, 0, :3] = 255
    warped_images, valid = warp_to_view(images, params)
    warped_probabilities, _ = warp_to_view(probabilities, params, mode="bilinear")
    warped_labels, _ = warp_to_view(labels, params, mode="nearest")
    assert valid.all()
    assert (warped_images - images).abs().max() == 0
    assert (warped_probabilities - probabilities).abs().max() == 0
    assert torch.equal(warped_labels, labels)
    assert warped_probabilities.dtype == torch.float64 and warped_labels.dtype == torch.long


def test_weak_augment_without_rescale_crop_or_flip_is_exact_identity():
    images = torch.randint(0, 256, (2, 3, 12, 20), dtype=torch.uint8, generator=_generator())
    labels = torch.randint(0, 19, (2, 12, 20), generator=_generator(1))
    view = weak_augment(
        images, labels, crop_size=None, scale_range=(1.0, 1.0), flip=False, generator=_generator()
    )
    assert torch.equal(view.images, to_float(images))
    assert torch.equal(view.labels, labels)
    assert view.valid_mask.all()
    assert torch.equal(view.params.crop_offset, torch.zeros(2, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ weak view
def test_weak_labels_equal_independent_reference_and_warping_the_labels():
    n, height, width = 6, 20, 30
    images = torch.rand(n, 3, height, width, generator=_generator(0))
    labels = torch.randint(0, 19, (n, height, width), generator=_generator(1))
    labels[:, :2] = 255
    for seed, crop in [(0, (16, 24)), (1, (24, 40)), (2, (9, 11))]:
        view = weak_augment(
            images, labels, crop_size=crop, scale_range=(0.5, 1.5), generator=_generator(seed)
        )
        expected = _reference_weak_labels(labels, view.params)
        assert torch.equal(view.labels, expected)
        warped, valid = warp_to_view(labels, view.params, mode="nearest")
        assert torch.equal(warped, view.labels)
        assert torch.equal(valid, view.valid_mask)
        assert torch.equal(view.labels == 255, (expected == 255))


def test_weak_images_match_interpolate_then_crop_and_flip():
    n, height, width = 5, 18, 26
    images = torch.rand(n, 3, height, width, generator=_generator(0))
    view = weak_augment(images, crop_size=(14, 20), scale_range=(0.6, 1.7), generator=_generator(4))
    expected = _reference_weak_images(images, view.params)
    valid = view.valid_mask[:, None].expand_as(expected)
    torch.testing.assert_close(view.images[valid], expected[valid], rtol=0, atol=2e-6)
    assert (view.images[~valid] == 0).all()
    assert view.labels is None


def test_integer_crops_and_flips_copy_pixels_exactly():
    images = torch.rand(8, 3, 16, 24, generator=_generator(0))
    probabilities = _smooth_maps(8, 5, (16, 24))
    view = weak_augment(images, crop_size=(10, 15), scale_range=(1.0, 1.0), generator=_generator(5))
    assert view.params.flip.any() and not view.params.flip.all()
    for i in range(8):
        top, left = view.params.crop_offset[i].tolist()
        crop = images[i, :, top : top + 10, left : left + 15]
        crop = crop.flip(-1) if bool(view.params.flip[i]) else crop
        assert torch.equal(view.images[i], crop)
    warped, valid = warp_to_view(probabilities, view.params)
    assert valid.all()
    for i in range(8):
        top, left = view.params.crop_offset[i].tolist()
        crop = probabilities[i, :, top : top + 10, left : left + 15]
        assert torch.equal(warped[i], crop.flip(-1) if bool(view.params.flip[i]) else crop)


def test_padding_is_invalid_ignore_and_fill():
    images = torch.rand(4, 3, 16, 16, generator=_generator(0))
    labels = torch.randint(0, 19, (4, 16, 16), generator=_generator(1))
    view = weak_augment(images, labels, crop_size=(20, 20), scale_range=(0.5, 1.0), generator=_generator(2))
    scaled = view.params.scaled_size
    assert (scaled <= 20).all()
    # the whole rescaled image lies inside the crop: exactly its pixels are valid
    assert torch.equal(view.valid_mask.sum((1, 2)), scaled[:, 0] * scaled[:, 1])
    assert torch.equal(view.labels == 255, ~view.valid_mask)
    assert (view.images.permute(1, 0, 2, 3)[:, ~view.valid_mask] == 0).all()
    filled = weak_augment(
        images, labels, crop_size=(20, 20), scale_range=(0.5, 1.0), generator=_generator(2), image_fill=0.25
    )
    assert (filled.images.permute(1, 0, 2, 3)[:, ~filled.valid_mask] == 0.25).all()


def test_flip_twice_is_identity():
    images = torch.rand(6, 3, 9, 14, generator=_generator(0))
    labels = torch.randint(0, 19, (6, 9, 14), generator=_generator(1))
    view = weak_augment(images, crop_size=None, scale_range=(1.0, 1.0), flip=True, generator=_generator(3))
    assert view.params.flip.any()
    twice = compose(view.params, view.params)
    assert (warp_to_view(images, twice)[0] - images).abs().max() == 0
    assert torch.equal(warp_to_view(labels, twice, mode="nearest")[0], labels)
    once, _ = warp_to_view(images, view.params)
    assert (warp_to_view(once, view.params)[0] - images).abs().max() == 0
    flipped = view.params.flip.view(6, 1, 1, 1)
    assert torch.equal(once, torch.where(flipped, images.flip(-1), images))


def test_low_resolution_maps_warp_like_upsampled_ones():
    """Warping a 1/4-resolution map then upsampling equals upsampling then warping: exactly (up to float) for a
    linear map, within interpolation error for smooth probability maps; the valid mask ignores resolution."""
    n, height, width = 4, 64, 96
    ys, xs = torch.meshgrid(torch.arange(height // 4) + 0.5, torch.arange(width // 4) + 0.5, indexing="ij")
    ramp = torch.stack([4 * xs, 4 * ys]).expand(n, 2, height // 4, width // 4).contiguous()
    probabilities = F.interpolate(_smooth_maps(n, 6, (height, width), seed=3), size=(16, 24), mode="bilinear")
    view = weak_augment(torch.rand(n, 3, height, width), crop_size=(48, 48), generator=_generator(6))
    for low, tolerance_max, tolerance_mean in [(ramp, 1e-4, 1e-5), (probabilities, 0.15, 0.03)]:
        warped_low, valid_low = warp_to_view(low, view.params, output_size=(12, 12))
        assert valid_low.shape == (n, 12, 12)
        upsampled_after = F.interpolate(warped_low, size=(48, 48), mode="bilinear", align_corners=False)
        upsampled_first = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
        warped_full, valid_full = warp_to_view(upsampled_first, view.params)
        # away from padding, the view's edges and the source's edges (where upsampling clamps)
        outside = F.pad((~valid_full)[:, None].float(), (1, 1, 1, 1), value=1.0)
        inner = F.max_pool2d(outside, 9, stride=1, padding=4)[:, 0, 1:-1, 1:-1] == 0
        source_x, _ = warp_to_view(ramp[:, :1], view.params)
        source_y, _ = warp_to_view(ramp[:, 1:], view.params)
        inner &= (source_x[:, 0] > 8) & (source_x[:, 0] < width - 8)
        inner &= (source_y[:, 0] > 8) & (source_y[:, 0] < height - 8)
        assert inner.float().mean() > 0.3
        difference = (upsampled_after - warped_full).abs().amax(1)[inner]
        assert difference.max() < tolerance_max and difference.mean() < tolerance_mean
        direct, valid_direct = warp_to_view(low, view.params, output_size=(48, 48))
        assert torch.equal(valid_direct, valid_full)
        assert (direct - warped_full).abs().amax(1)[inner].max() < tolerance_max


def test_warp_matches_grid_sample_for_arbitrary_affines():
    n = 5
    maps = torch.rand(n, 4, 11, 17, generator=_generator(0))
    affine = torch.eye(2, 3).repeat(n, 1, 1) + 0.3 * torch.randn(n, 2, 3, generator=_generator(1))
    warped, valid = warp_to_view(maps, affine, output_size=(13, 9))
    grid = F.affine_grid(affine, (n, 4, 13, 9), align_corners=False)
    expected = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    expected_valid = (grid.abs() <= 1).all(-1)
    assert torch.equal(valid, expected_valid)
    # sample positions within 1e-3 pixel of a pixel centre snap onto it: differences up to that much
    torch.testing.assert_close(warped, torch.where(valid[:, None], expected, 0.0), rtol=0, atol=2e-3)
    labels = torch.randint(0, 19, (n, 11, 17), generator=_generator(2))
    nearest, _ = warp_to_view(labels, affine, output_size=(13, 9), mode="nearest")
    expected_nearest = F.grid_sample(labels[:, None].float(), grid, mode="nearest", align_corners=False)[:, 0]
    expected_nearest = torch.where(valid, expected_nearest.long(), 255)
    assert (nearest != expected_nearest).float().mean() < 0.02  # only rounding ties may differ


def test_warp_to_view_rejects_bad_input():
    params = identity_params(2, (4, 4))
    with pytest.raises(ValueError, match="nearest"):
        warp_to_view(torch.zeros(2, 4, 4, dtype=torch.long), params, mode="bilinear")
    with pytest.raises(ValueError, match="N x 2 x 3"):
        warp_to_view(torch.zeros(3, 1, 4, 4), params)
    with pytest.raises(ValueError, match="mode"):
        warp_to_view(torch.zeros(2, 1, 4, 4), params, mode="bicubic")
    with pytest.raises(ValueError, match="output_size"):
        warp_to_view(torch.zeros(2, 1, 4, 4), params.affine)


# ------------------------------------------------------------------------------------------------ strong view
def test_strong_view_shapes_range_and_reproducibility():
    images = torch.rand(6, 3, 24, 32, generator=_generator(0))
    first = strong_augment(images, generator=_generator(7))
    second = strong_augment(images, generator=_generator(7))
    other = strong_augment(images, generator=_generator(8))
    assert first.images.shape == images.shape and first.images.dtype == torch.float32
    assert first.cutout_mask.shape == first.valid_mask.shape == (6, 24, 32)
    assert first.params.affine.shape == (6, 2, 3) and first.params.randaugment_ops.shape == (6, 2)
    assert first.images.min() >= 0 and first.images.max() <= 1
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.params.affine, second.params.affine)
    assert not torch.equal(first.images, other.images)
    ops = first.params.randaugment_ops
    assert (ops[:, 0] != ops[:, 1]).all()
    assert (first.images[first.cutout_mask[:, None].expand_as(images)] == 0.5).all()


def test_strong_view_on_the_cpu_computes_each_op_for_its_images_only_with_the_batch_path_values(monkeypatch):
    """On the CPU each photometric op and the blur run on the images that drew them; the result equals the
    batch path (every op on every image, torch.where picks), which other devices take."""
    from cpsl_hf.data import transforms

    images = torch.rand(14, 3, 24, 32, generator=_generator(0)) ** 1.5
    options = dict(randaugment_ops=PHOTOMETRIC_OPS, num_randaugment_ops=3, blur_p=0.5)
    calls = []
    selective = transforms._where_applied

    def counting(on, operation, chosen, *per_image):
        calls.append(int(on.sum()))
        return selective(on, operation, chosen, *per_image)

    monkeypatch.setattr(transforms, "_where_applied", counting)
    view = strong_augment(images, generator=_generator(3), **options)

    def batch_path(on, operation, chosen, *per_image):
        return torch.where(on.view(-1, 1, 1, 1), operation(chosen, *per_image), chosen)

    monkeypatch.setattr(transforms, "_where_applied", batch_path)
    reference = strong_augment(images, generator=_generator(3), **options)
    torch.testing.assert_close(view.images, reference.images, rtol=0, atol=1e-6)
    assert len(calls) == len(PHOTOMETRIC_OPS) - 1 + 1  # every op but identity, and the blur
    assert sum(calls[:-1]) == 14 * 3 - int(
        (reference.params.randaugment_ops == PHOTOMETRIC_OPS.index("identity")).sum()
    )


@pytest.mark.parametrize("op", PHOTOMETRIC_OPS)
def test_each_photometric_op_keeps_range_and_geometry(op):
    """Photometric ops commute with a horizontal flip (they do not move pixels) and keep [0, 1]."""
    images = torch.rand(4, 3, 16, 20, generator=_generator(0)) ** 2
    options = dict(randaugment_ops=(op,), num_randaugment_ops=1, cutout=False)
    view = strong_augment(images, generator=_generator(1), **options)
    mirrored = strong_augment(images.flip(-1), generator=_generator(1), **options)
    assert view.images.min() >= 0 and view.images.max() <= 1
    torch.testing.assert_close(mirrored.images.flip(-1), view.images, rtol=0, atol=1e-5)
    assert torch.equal(view.params.affine, identity_params(4, (16, 20)).affine)
    assert view.valid_mask.all()


def test_strong_photometric_only_view_keeps_geometry():
    images = torch.rand(5, 3, 16, 20, generator=_generator(0))
    view = strong_augment(images, generator=_generator(2), randaugment_ops=PHOTOMETRIC_OPS, cutout=False)
    mirrored = strong_augment(
        images.flip(-1), generator=_generator(2), randaugment_ops=PHOTOMETRIC_OPS, cutout=False
    )
    torch.testing.assert_close(mirrored.images.flip(-1), view.images, rtol=0, atol=1e-5)
    assert view.valid_mask.all()
    assert (view.images - images).abs().max() > 0.01  # something did change


@pytest.mark.parametrize("op", GEOMETRIC_OPS)
def test_geometric_ops_are_recorded(op):
    """The strong image equals the (photometrically unchanged) weak image warped by the recorded affine."""
    images = torch.rand(4, 3, 16, 24, generator=_generator(0))
    view = strong_augment(
        images,
        generator=_generator(3),
        randaugment_ops=(op,),
        num_randaugment_ops=1,
        color_jitter_p=0.0,
        blur=False,
        cutout=False,
        fill=0.5,
    )
    grid = F.affine_grid(view.params.affine, (4, 3, 16, 24), align_corners=False)
    expected = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    expected = torch.where(view.valid_mask[:, None], expected, 0.5)
    torch.testing.assert_close(view.images, expected, rtol=0, atol=2e-3)
    assert not torch.equal(view.params.affine, identity_params(4, (16, 24)).affine)


def test_composed_weak_then_strong_maps_source_coordinates():
    """Warping a coordinate ramp of the full image weak->strong in two steps equals the composed warp."""
    n, height, width = 4, 40, 60
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    ramp = torch.stack([xs, ys]).expand(n, 2, height, width).contiguous()
    weak = weak_augment(torch.rand(n, 3, height, width), crop_size=(32, 32), generator=_generator(0))
    strong = strong_augment(weak.images, generator=_generator(1), randaugment_ops=GEOMETRIC_OPS)
    composed = compose(weak.params, strong.params)
    assert composed.view_size == (32, 32) and torch.equal(composed.source_size, weak.params.source_size)
    direct, valid_direct = warp_to_view(ramp, composed)
    weak_ramp, _ = warp_to_view(ramp, weak.params)
    two_step, valid_two_step = warp_to_view(weak_ramp, strong.params)
    # pixels that are valid in both and well inside both frames (bilinear is exact on linear maps there)
    both = valid_direct & valid_two_step
    weak_ys, weak_xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    weak_frame_ramp = torch.stack([weak_xs, weak_ys]).expand(n, 2, 32, 32).contiguous()
    weak_position, _ = warp_to_view(weak_frame_ramp, strong.params)
    weak_padding, _ = warp_to_view((~weak.valid_mask)[:, None].float(), strong.params)
    interior = (
        both
        & (weak_padding[:, 0] == 0)
        & (weak_position > 1.5).all(1)
        & (weak_position < 32 - 1.5).all(1)
        & (direct[:, 0] > 1.5)
        & (direct[:, 0] < width - 1.5)
        & (direct[:, 1] > 1.5)
        & (direct[:, 1] < height - 1.5)
    )
    assert interior.float().mean() > 0.2
    difference = (direct - two_step).abs().amax(1)[interior]
    assert difference.max() < 1e-3 * max(height, width)


# ------------------------------------------------------------------------------------------------ mixing
def test_class_mix_pastes_half_the_classes_of_a():
    n, height, width = 5, 12, 16
    images_a = torch.rand(n, 3, height, width, generator=_generator(0))
    images_b = torch.rand(n, 3, height, width, generator=_generator(1))
    labels_a = torch.randint(0, 7, (n, height, width), generator=_generator(2))
    labels_a[:, :2] = 255
    labels_a[0] = torch.where(labels_a[0] == 255, 255, 3)  # a single class
    labels_b = torch.randint(0, 19, (n, height, width), generator=_generator(3))
    mixed = class_mix(images_a, labels_a, images_b, labels_b, generator=_generator(4))
    mask = mixed.mask
    assert torch.equal(mixed.labels, torch.where(mask, labels_a, labels_b))
    assert torch.equal(mixed.images, torch.where(mask[:, None], images_a, images_b))
    assert not mask[labels_a == 255].any()
    for i in range(n):
        present = set(labels_a[i].unique().tolist()) - {255}
        chosen = set(labels_a[i][mask[i]].unique().tolist())
        assert len(chosen) == math.ceil(len(present) / 2)
        assert torch.equal(mask[i], torch.isin(labels_a[i], torch.tensor(sorted(chosen), dtype=torch.long)))
    again = class_mix(images_a, labels_a, images_b, labels_b, generator=_generator(4))
    assert torch.equal(again.mask, mask)
    never = class_mix(images_a, labels_a, images_b, labels_b, generator=_generator(4), p=0.0)
    assert not never.mask.any() and torch.equal(never.labels, labels_b)


def test_cut_mix_pastes_a_box_of_half_the_area():
    n, height, width = 16, 20, 32
    images_a = torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=_generator(0))
    images_b = torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=_generator(1))
    labels_a = torch.randint(0, 19, (n, height, width), generator=_generator(2))
    labels_b = torch.randint(0, 19, (n, height, width), generator=_generator(3))
    mixed = cut_mix(images_a, labels_a, images_b, labels_b, generator=_generator(5))
    mask = mixed.mask
    assert torch.equal(mixed.labels, torch.where(mask, labels_a, labels_b))
    assert torch.equal(mixed.images, torch.where(mask[:, None], images_a, images_b))
    box_h, box_w = round(height * math.sqrt(0.5)), round(width * math.sqrt(0.5))
    areas = mask.sum((1, 2))
    assert set(areas.tolist()) <= {0, box_h * box_w}
    assert 0 < (areas > 0).sum() < n  # p = 0.5
    for i in torch.nonzero(areas).flatten().tolist():
        rows, cols = mask[i].any(1), mask[i].any(0)
        assert rows.sum() == box_h and cols.sum() == box_w
        assert torch.equal(mask[i], rows[:, None] & cols[None, :])
    always = cut_mix(images_a, labels_a, images_b, labels_b, generator=_generator(5), p=1.0)
    assert (always.mask.sum((1, 2)) == box_h * box_w).all()
    with pytest.raises(ValueError, match="labels_a"):
        cut_mix(images_a, labels_a[:, :4], images_b, labels_b)


# ------------------------------------------------------------------------------------------------ misc
def test_shapes_are_static_and_seeded_views_reproduce():
    images = torch.randint(0, 256, (3, 3, 30, 40), dtype=torch.uint8, generator=_generator(0))
    labels = torch.randint(0, 19, (3, 30, 40), generator=_generator(1))
    shapes = set()
    for seed in range(4):
        view = weak_augment(images, labels, crop_size=(24, 24), generator=_generator(seed))
        strong = strong_augment(view.images, generator=_generator(seed))
        shapes.add((view.images.shape, view.labels.shape, strong.images.shape, strong.valid_mask.shape))
    assert shapes == {((3, 3, 24, 24), (3, 24, 24), (3, 3, 24, 24), (3, 24, 24))}
    first = weak_augment(images, labels, crop_size=(24, 24), generator=_generator(11))
    second = weak_augment(images, labels, crop_size=(24, 24), generator=_generator(11))
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert torch.equal(first.params.affine, second.params.affine)
    moved = first.params.to("cpu")
    assert type(moved) is type(first.params) and torch.equal(moved.crop_offset, first.params.crop_offset)
    unseeded = weak_augment(images, labels, crop_size=(24, 24))  # the global RNG
    assert torch.equal(warp_to_view(labels, unseeded.params, mode="nearest")[0], unseeded.labels)


@pytest.mark.parametrize("op", ["equalize", "posterize"])
def test_equalize_and_posterize_match_pil(op):
    from PIL import Image, ImageOps

    images = torch.randint(0, 256, (3, 3, 10, 14), dtype=torch.uint8, generator=_generator(0))
    images[1] = images[1] // 4 + 100  # a narrow histogram
    images[2, :, :5] = 7  # a dominant value
    view = strong_augment(
        images,
        generator=_generator(1),
        randaugment_ops=(op,),
        num_randaugment_ops=1,
        color_jitter_p=0.0,
        blur=False,
        cutout=False,
    )
    magnitudes = view.params.randaugment_magnitudes[:, 0]
    for i in range(3):
        pil_image = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        if op == "equalize":
            expected = ImageOps.equalize(pil_image)
        else:
            bits = 8 - math.floor(4 * abs(float(magnitudes[i])) + 0.5)
            expected = ImageOps.posterize(pil_image, bits)
        expected = torch.from_numpy(np.array(expected)).permute(2, 0, 1)
        assert torch.equal((view.images[i] * 255).round().to(torch.uint8), expected)


def test_rotation_is_a_rigid_rotation_in_pixels_for_non_square_views():
    images = torch.rand(4, 3, 12, 30, generator=_generator(0))
    view = strong_augment(images, generator=_generator(2), randaugment_ops=("rotate",), num_randaugment_ops=1)
    half = torch.tensor([30 / 2.0, 12 / 2.0])
    pixel_linear = half[:, None] * view.params.affine[:, :, :2] / half[None, :]  # D A D^-1
    angle = torch.deg2rad(view.params.rotate_degrees)
    expected = torch.stack(
        [torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -2
    )
    torch.testing.assert_close(pixel_linear, expected, rtol=0, atol=1e-6)
    assert (view.params.rotate_degrees.abs() > 0).all() and (view.params.rotate_degrees.abs() <= 30).all()
