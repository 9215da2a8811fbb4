"""``resize_bilinear``: ``F.interpolate(mode="bilinear", align_corners=False)``'s values and gradients (to float
rounding) as matrix products on the CPU; the identity at the same size."""

import pytest
import torch
import torch.nn.functional as F

from cpsl_hf.modeling_cpsl import _interpolation_weights, pixel_affine, resize_bilinear


@pytest.mark.parametrize(
    "shape, size",
    [
        ((2, 3, 8, 8), (32, 32)),  # x4, the SegFormer head's and the loss's
        ((1, 5, 4, 4), (32, 32)),  # x8
        ((2, 19, 32, 32), (128, 128)),
        ((1, 2, 7, 5), (23, 11)),  # odd, non-integer factors
        ((1, 2, 17, 13), (5, 4)),  # downsampling
        ((3, 1, 1, 1), (3, 6)),  # a single pixel
        ((1, 4, 9, 16), (9, 40)),  # one axis unchanged
    ],
)
def test_values_and_gradients_are_those_of_interpolate(shape, size):
    generator = torch.Generator().manual_seed(sum(shape) + sum(size))
    maps = torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
    reference = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    resized = resize_bilinear(maps, size)
    assert resized.shape == reference.shape and resized.dtype == torch.float64
    torch.testing.assert_close(resized, reference, rtol=0, atol=1e-12)
    upstream = torch.randn(reference.shape, dtype=torch.float64, generator=generator)
    (gradient,) = torch.autograd.grad(resized, maps, upstream)
    (reference_gradient,) = torch.autograd.grad(reference, maps, upstream)
    torch.testing.assert_close(gradient, reference_gradient, rtol=0, atol=1e-12)
    # float32 agrees to float32 rounding
    single = maps.detach().float()
    torch.testing.assert_close(
        resize_bilinear(single, size),
        F.interpolate(single, size=size, mode="bilinear", align_corners=False),
        rtol=1e-5,
        atol=1e-5,
    )


def test_the_same_size_is_the_identity_and_autocast_keeps_the_dtype():
    maps = torch.randn(2, 3, 5, 6)
    assert resize_bilinear(maps, (5, 6)) is maps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resize_bilinear(maps, (10, 12)).dtype == torch.float32  # the maps' dtype, not autocast's
        assert resize_bilinear(maps.bfloat16(), (10, 12)).dtype == torch.bfloat16


def test_interpolation_weights_by_hand():
    # 2 -> 4: source coordinates -0.25 (clamped to 0), 0.25, 0.75, 1.25 (border: the last index repeated)
    expected = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(_interpolation_weights(2, 4), expected, rtol=0, atol=0)
    # 4 -> 2: source coordinates 0.5 and 2.5
    expected = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(_interpolation_weights(4, 2), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape, size", [((2, 6, 8, 8), (32, 32)), ((1, 3, 7, 5), (23, 11)), ((2, 4, 17, 13), (5, 4))]
)
def test_channels_last_maps_give_the_same_values_and_gradients_and_stay_channels_last(shape, size):
    generator = torch.Generator().manual_seed(sum(shape))
    plain = torch.randn(shape, dtype=torch.float64, generator=generator)
    maps = plain.contiguous(memory_format=torch.channels_last).requires_grad_()
    resized = resize_bilinear(maps, size)
    assert resized.is_contiguous(memory_format=torch.channels_last) and not resized.is_contiguous()
    reference = F.interpolate(plain.requires_grad_(), size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, reference, rtol=0, atol=1e-12)
    upstream = torch.randn(reference.shape, dtype=torch.float64, generator=generator)
    (gradient,) = torch.autograd.grad(resized, maps, upstream)
    (reference_gradient,) = torch.autograd.grad(reference, plain, upstream)
    torch.testing.assert_close(gradient, reference_gradient, rtol=0, atol=1e-12)


def test_pixel_affine_is_a_1x1_convolution_with_channels_last_output():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 5, 6, 7, dtype=torch.float64, generator=generator)
    weight = torch.randn(3, 5, dtype=torch.float64, generator=generator)
    bias = torch.randn(3, dtype=torch.float64, generator=generator)
    mapped = pixel_affine(maps, weight, bias)
    assert mapped.is_contiguous(memory_format=torch.channels_last)
    expected = torch.einsum("oc,nchw->nohw", weight, maps) + bias[:, None, None]
    torch.testing.assert_close(mapped, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(pixel_affine(maps, weight), expected - bias[:, None, None], rtol=0, atol=1e-12)


def test_weights_first_built_under_inference_mode_still_train():
    """An evaluation (inference mode) that builds a size's cached weights first must not break a later training
    step at the same size: the cache never holds inference tensors (float64 maps use the cached tensor as is)."""
    from cpsl_hf.modeling_cpsl import _INTERPOLATION_WEIGHTS

    size = (23, 29)
    for key in [(7, size[0]), (5, size[1])]:
        _INTERPOLATION_WEIGHTS.pop(key, None)
    with torch.inference_mode():
        resize_bilinear(torch.rand(1, 2, 7, 5, dtype=torch.float64), size)
    maps = torch.rand(1, 2, 7, 5, dtype=torch.float64, requires_grad=True)
    resize_bilinear(maps, size).square().sum().backward()
    expected = torch.autograd.grad(
        F.interpolate(maps, size=size, mode="bilinear", align_corners=False).square().sum(), maps
    )[0]
    torch.testing.assert_close(maps.grad, expected)
