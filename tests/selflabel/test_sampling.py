"""class_balanced_sample / uniform_sample: exact apportionment, only labelled pixels, no duplicates (hypothesis)."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpsl_hf.selflabel import class_balanced_sample, uniform_sample

IGNORE = 255


def hamilton_quotas(counts: dict[int, int], num_samples: int) -> dict[int, int]:
    """Largest-remainder apportionment with exact fractions; ties go to the smaller class id."""
    total = sum(counts.values())
    if total <= num_samples:
        return dict(counts)
    shares = {c: Fraction(num_samples * n, total) for c, n in counts.items()}
    quotas = {c: int(share) for c, share in shares.items()}
    leftover = num_samples - sum(quotas.values())
    by_remainder = sorted(counts, key=lambda c: (-(shares[c] - quotas[c]), c))
    for c in by_remainder[:leftover]:
        quotas[c] += 1
    return quotas


@st.composite
def label_maps(draw):
    num_images = draw(st.integers(1, 4))
    height = draw(st.integers(1, 9))
    width = draw(st.integers(1, 9))
    num_classes = draw(st.integers(1, 6))
    ignore_share = draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(num_classes, 0.5))
    labels = rng.choice(num_classes, size=(num_images, height, width), p=weights)
    labels[rng.random(labels.shape) < ignore_share] = IGNORE
    if draw(st.booleans()):
        labels[0] = IGNORE  # an all-ignored image
    num_samples = draw(st.integers(1, height * width + 5))
    return torch.from_numpy(labels).long(), num_samples, seed


def check_common(labels, indices, valid, num_samples):
    num_images = labels.shape[0]
    flat = labels.reshape(num_images, -1)
    assert indices.shape == (num_images, num_samples) and indices.dtype == torch.long
    assert valid.shape == (num_images, num_samples) and valid.dtype == torch.bool
    for n in range(num_images):
        labelled = int((flat[n] != IGNORE).sum())
        chosen = indices[n][valid[n]]
        assert chosen.numel() == min(num_samples, labelled)
        assert valid[n].tolist() == [i < min(num_samples, labelled) for i in range(num_samples)]
        assert (flat[n][chosen] != IGNORE).all(), "an ignored pixel was drawn"
        assert chosen.unique().numel() == chosen.numel(), "a pixel was drawn twice"
        assert ((chosen >= 0) & (chosen < flat.shape[1])).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_maps())
def test_class_balanced_counts_equal_apportionment(case):
    labels, num_samples, seed = case
    indices, valid = class_balanced_sample(labels, num_samples, IGNORE, torch.Generator().manual_seed(seed))
    check_common(labels, indices, valid, num_samples)
    # the bounded-class path (labels < 6 here) gives the very same draw
    bounded = class_balanced_sample(
        labels, num_samples, IGNORE, torch.Generator().manual_seed(seed), num_classes=6
    )
    torch.testing.assert_close(bounded, (indices, valid), rtol=0, atol=0)
    flat = labels.reshape(labels.shape[0], -1)
    for n in range(labels.shape[0]):
        values, counts = flat[n][flat[n] != IGNORE].unique(return_counts=True)
        expected = hamilton_quotas(dict(zip(values.tolist(), counts.tolist())), num_samples)
        drawn_values, drawn_counts = flat[n][indices[n][valid[n]]].unique(return_counts=True)
        drawn = dict(zip(drawn_values.tolist(), drawn_counts.tolist()))
        assert drawn == {c: q for c, q in expected.items() if q > 0}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_maps())
def test_uniform_sample_draws_only_labelled_pixels_once(case):
    labels, num_samples, seed = case
    indices, valid = uniform_sample(labels, num_samples, IGNORE, torch.Generator().manual_seed(seed))
    check_common(labels, indices, valid, num_samples)


def test_known_apportionment_and_leftover_to_largest_remainder():
    # 10 labelled pixels: 5 of class 0, 3 of class 1, 2 of class 2; M = 4 -> shares 2.0, 1.2, 0.8
    # floors 2, 1, 0 and the one leftover goes to class 2 (remainder 0.8).
    labels = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, IGNORE, IGNORE]])
    for seed in range(5):
        indices, valid = class_balanced_sample(labels, 4, IGNORE, torch.Generator().manual_seed(seed))
        assert valid.all()
        assert sorted(labels[0, indices[0]].tolist()) == [0, 0, 1, 2]


def test_draws_are_uniform_within_a_class():
    # class 1 has 4 pixels and quota 1 (M = 2 of 8 labelled pixels) -> each should be drawn about 1/4 of the time
    labels = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0]]).repeat(2000, 1)
    indices, _ = class_balanced_sample(labels, 2, IGNORE, torch.Generator().manual_seed(0))
    picked_class_one = torch.where(labels.gather(1, indices) == 1, indices, -1).max(dim=1).values
    frequencies = torch.bincount(picked_class_one, minlength=8)[[0, 2, 4, 6]].double() / 2000
    assert (frequencies - 0.25).abs().max() < 0.04  # > 4 standard deviations


def test_same_generator_seed_same_draw_and_labels_of_any_int_dtype():
    labels = torch.randint(0, 4, (3, 7, 5), generator=torch.Generator().manual_seed(1))
    a = class_balanced_sample(labels, 9, IGNORE, torch.Generator().manual_seed(5))
    b = class_balanced_sample(labels.to(torch.uint8), 9, IGNORE, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_labels_outside_num_classes_count_as_ignored():
    labels = torch.tensor([[0, 1, 7, 7, 7, 7, -3, 1]])
    indices, valid = class_balanced_sample(labels, 3, IGNORE, num_classes=2)
    assert valid.all() and sorted(labels[0, indices[0]].tolist()) == [0, 1, 1]


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="integer"):
        class_balanced_sample(torch.zeros(2, 3, 3), 4)
    with pytest.raises(ValueError, match="N x h x w"):
        uniform_sample(torch.zeros(3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="num_samples"):
        class_balanced_sample(torch.zeros(1, 3, 3, dtype=torch.long), 0)
