"""sinkhorn: against an independent float64 loop, against POT at convergence, under autocast, with masked rows."""

import numpy as np
import ot
import pytest
import torch

from cpsl_hf.selflabel import sinkhorn


def loop_sinkhorn(scores: np.ndarray, prior: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """The textbook iteration, element by element in float64 (independent of the implementation's factored form)."""
    num_rows, num_classes = scores.shape
    q = np.exp(scores.astype(np.float64) / epsilon)
    q /= q.sum()
    for _ in range(iterations):
        for c in range(num_classes):
            q[:, c] *= prior[c] / q[:, c].sum()
        for i in range(num_rows):
            q[i, :] *= (1.0 / num_rows) / q[i, :].sum()
    return q * num_rows


def random_cosines(num_rows: int, num_classes: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(num_rows, dim, generator=generator), dim=1)
    w = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    return z @ w.t()


def random_prior(num_classes: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    prior = torch.rand(num_classes, generator=generator) + 0.05
    return prior / prior.sum()


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_matches_float64_loop(iterations):
    scores = random_cosines(60, 7)
    prior = random_prior(7)
    expected = loop_sinkhorn(scores.numpy(), prior.numpy(), 0.05, iterations)
    result = sinkhorn(scores.double(), prior.double(), epsilon=0.05, iterations=iterations)
    assert result.dtype == torch.float64
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-10, atol=1e-14)
    result32 = sinkhorn(scores, prior, epsilon=0.05, iterations=iterations)
    assert result32.dtype == torch.float32
    np.testing.assert_allclose(result32.numpy(), expected, rtol=2e-4, atol=1e-6)


def test_uniform_prior_is_default():
    scores = random_cosines(40, 5)
    expected = loop_sinkhorn(scores.numpy(), np.full(5, 0.2), 0.05, 3)
    np.testing.assert_allclose(sinkhorn(scores.double()).numpy(), expected, rtol=1e-10)


def test_prior_is_normalised():
    scores = random_cosines(30, 4).double()
    prior = random_prior(4).double()
    torch.testing.assert_close(sinkhorn(scores, prior * 37.0), sinkhorn(scores, prior))


def test_converges_to_pot_plan_and_marginals():
    num_rows, num_classes = 200, 6
    scores = random_cosines(num_rows, num_classes, seed=3).double()
    prior = random_prior(num_classes, seed=4).double()
    epsilon = 0.1
    plan = ot.sinkhorn(
        np.full(num_rows, 1.0 / num_rows),
        prior.numpy(),
        -scores.numpy(),
        reg=epsilon,
        numItermax=5000,
        stopThr=1e-8,
    )
    result = sinkhorn(scores, prior, epsilon=epsilon, iterations=5000)
    np.testing.assert_allclose(result.numpy() / num_rows, plan, atol=1e-9)
    np.testing.assert_allclose(result.sum(dim=1).numpy(), np.ones(num_rows), atol=1e-5)
    np.testing.assert_allclose((result.sum(dim=0) / num_rows).numpy(), prior.numpy(), atol=1e-5)
    # float32 reaches the same marginals
    result32 = sinkhorn(scores.float(), prior.float(), epsilon=epsilon, iterations=5000)
    np.testing.assert_allclose(result32.sum(dim=1).numpy(), np.ones(num_rows), atol=1e-5)
    np.testing.assert_allclose((result32.sum(dim=0) / num_rows).numpy(), prior.numpy(), atol=1e-5)


@pytest.mark.parametrize("low_precision", [torch.float16, torch.bfloat16])
def test_low_precision_input_under_autocast_equals_float32(low_precision):
    scores = random_cosines(500, 19, seed=5).to(low_precision)
    prior = random_prior(19, seed=6).to(low_precision)
    reference = sinkhorn(scores.float(), prior.float())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        result = sinkhorn(scores, prior)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, reference, rtol=0, atol=0)
    assert torch.isfinite(result).all()
    # the naive half-precision version overflows: exp(1 / 0.05) is beyond fp16's range
    if low_precision == torch.float16:
        assert torch.isinf(torch.exp(torch.ones((), dtype=torch.float16) / 0.05))


def test_scores_computed_under_autocast_are_handled():
    z = torch.nn.functional.normalize(torch.randn(300, 32), dim=1)
    w = torch.nn.functional.normalize(torch.randn(10, 32), dim=1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        scores = z @ w.t()
        assert scores.dtype == torch.bfloat16
        result = sinkhorn(scores)
    torch.testing.assert_close(result, sinkhorn(scores.float()), rtol=0, atol=0)


def test_extreme_cosines_and_unpreferred_class_are_finite():
    num_rows = 64
    scores = torch.full((num_rows, 5), -1.0)
    scores[:, 0] = 1.0  # every pixel has cosine 1 to class 0
    scores[::2, 1] = 1.0
    # class 4 is preferred by nobody (cosine -1 everywhere)
    prior = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1])
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        result = sinkhorn(scores.to(dtype), prior, epsilon=0.05, iterations=3)
        assert torch.isfinite(result).all()
        torch.testing.assert_close(result.sum(dim=1).double(), torch.ones(num_rows, dtype=torch.float64))
    converged = sinkhorn(scores.double(), prior.double(), iterations=20000)
    torch.testing.assert_close(converged.sum(dim=0) / num_rows, prior.double(), atol=1e-5, rtol=0)


def test_zero_weight_rows_equal_running_on_the_other_rows():
    scores = random_cosines(50, 6, seed=7)
    prior = random_prior(6, seed=8)
    weights = torch.rand(50, generator=torch.Generator().manual_seed(9)) > 0.4
    kept = torch.nonzero(weights).squeeze(1)
    padded = sinkhorn(scores, prior, weights=weights, iterations=5)
    alone = sinkhorn(scores[kept], prior, iterations=5)
    torch.testing.assert_close(padded[kept], alone, rtol=1e-6, atol=1e-7)
    assert (padded[~weights] == 0).all()
    # junk in the masked rows (even huge cosines) changes nothing
    junk = scores.clone()
    junk[~weights] = 50.0
    torch.testing.assert_close(sinkhorn(junk, prior, weights=weights, iterations=5), padded, rtol=0, atol=0)
    # float64 too, against the loop on the kept rows
    expected = loop_sinkhorn(scores[kept].numpy(), prior.numpy(), 0.05, 5)
    padded64 = sinkhorn(scores.double(), prior.double(), weights=weights.double(), iterations=5)
    np.testing.assert_allclose(padded64[kept].numpy(), expected, rtol=1e-10)


def test_all_rows_masked_gives_zeros():
    result = sinkhorn(random_cosines(10, 3), weights=torch.zeros(10, dtype=torch.bool))
    assert (result == 0).all()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="B x C"):
        sinkhorn(torch.zeros(3))
    with pytest.raises(ValueError, match="prior"):
        sinkhorn(torch.zeros(3, 4), prior=torch.ones(5))
    with pytest.raises(ValueError, match="weights"):
        sinkhorn(torch.zeros(3, 4), weights=torch.ones(4))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.zeros(3, 4), epsilon=0.0)
