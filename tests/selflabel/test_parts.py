"""rectify, class_histogram, ClassPrior, prototype accumulation and the losses, each against a direct computation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpsl_hf.selflabel import (
    ClassPrior,
    PrototypeAccumulator,
    class_histogram,
    masked_cross_entropy,
    one_way_kl,
    prototypes_from_features,
    rce_loss,
    rectify,
    self_labeling_loss,
    symmetric_ce_loss,
    symmetric_kl,
)

IGNORE = 255


def softmax_maps(*shape, seed=0, scale=3.0):
    return torch.softmax(scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_rectify_is_argmax_of_product_with_threshold_and_mask():
    p_sl, p_st = softmax_maps(2, 5, 4, 3, seed=1), softmax_maps(2, 5, 4, 3, seed=2)
    product = p_sl.numpy() * p_st.numpy()
    np.testing.assert_array_equal(rectify(p_sl, p_st).numpy(), product.argmax(axis=1))
    confidence = product.max(axis=1) / product.sum(axis=1)
    threshold = float(np.median(confidence))
    expected = np.where(confidence >= threshold, product.argmax(axis=1), IGNORE)
    np.testing.assert_array_equal(rectify(p_sl, p_st, threshold=threshold).numpy(), expected)
    mask = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(3)) > 0.5
    masked = rectify(p_sl, p_st, valid_mask=mask)
    assert (masked[~mask] == IGNORE).all() and (masked[mask] == rectify(p_sl, p_st)[mask]).all()
    zero = p_st.clone()
    zero[0, :, 0, 0] = 0.0  # no information: ignored, never a NaN label
    assert rectify(p_sl, zero)[0, 0, 0] == IGNORE
    with pytest.raises(ValueError, match="N x C x h x w"):
        rectify(p_sl, p_st[:, :4])


def test_class_histogram_matches_bincount():
    labels = torch.randint(0, 7, (3, 5, 6), generator=torch.Generator().manual_seed(0))
    labels[labels == 6] = IGNORE
    expected = np.bincount(labels[labels != IGNORE].numpy(), minlength=6)
    np.testing.assert_array_equal(class_histogram(labels, 6).numpy(), expected.astype(np.float32))


def test_class_prior_moving_average_static_and_state():
    prior = ClassPrior(torch.tensor([2.0, 1.0, 1.0]), momentum=0.9)
    expected = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(prior.distribution.numpy(), expected)
    for histogram in ([0.0, 10.0, 30.0], [5.0, 5.0, 0.0]):
        prior.update(torch.tensor(histogram))
        expected = 0.9 * expected + 0.1 * np.array(histogram) / sum(histogram)
        np.testing.assert_allclose(prior.distribution.numpy(), expected, rtol=1e-6)
    prior.update(torch.zeros(3))  # an all-ignored batch changes nothing
    np.testing.assert_allclose(prior.distribution.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(float(prior.entropy()), -(expected * np.log(expected)).sum(), rtol=1e-6)
    restored = ClassPrior.uniform(3, momentum=0.9)
    restored.load_state_dict(prior.state_dict())
    torch.testing.assert_close(restored.distribution, prior.distribution)
    static = ClassPrior(torch.tensor([1.0, 3.0]), static=True)
    static.update(torch.tensor([7.0, 0.0]))
    torch.testing.assert_close(static.distribution, torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="non-negative"):
        ClassPrior(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="shape"):
        prior.initialize_(torch.ones(4))


def test_prototypes_accumulate_sums_and_counts_over_batches():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(6, 4, 3, 5, generator=generator)
    probs = softmax_maps(6, 3, 3, 5, seed=4)
    valid = torch.rand(6, 3, 5, generator=generator) > 0.2
    labels = probs.argmax(dim=1)
    expected = np.zeros((3, 4))
    for c in range(3):
        chosen = ((labels == c) & valid).numpy()
        vectors = embeddings.permute(0, 2, 3, 1).numpy()[chosen].astype(np.float64)
        mean = vectors.mean(axis=0)
        expected[c] = mean / np.linalg.norm(mean)
    accumulator = PrototypeAccumulator(3, 4)
    for part in (slice(0, 1), slice(1, 4), slice(4, 6)):  # uneven batches: a mean of means would differ
        accumulator.update(embeddings[part], probs[part], valid_mask=valid[part])
    np.testing.assert_allclose(accumulator.compute().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        prototypes_from_features(embeddings, probs, valid_mask=valid).numpy(), expected, rtol=1e-5, atol=1e-6
    )
    # integer labels (ignore 255) give the same result
    by_labels = PrototypeAccumulator(3, 4)
    by_labels.update(embeddings, torch.where(valid, labels, IGNORE))
    torch.testing.assert_close(by_labels.compute(), accumulator.compute())
    # an unseen class gives a zero row and a zero count
    unseen = PrototypeAccumulator(4, 4)
    unseen.update(embeddings, labels)
    assert unseen.counts[3] == 0 and (unseen.compute()[3] == 0).all()


def test_self_labeling_loss_matches_cross_entropy_with_soft_targets():
    q = softmax_maps(10, 5, seed=5)
    logits = torch.randn(10, 5, generator=torch.Generator().manual_seed(6), requires_grad=True)
    expected = F.cross_entropy(logits, q)
    torch.testing.assert_close(self_labeling_loss(q, logits), expected)
    valid = torch.tensor([True] * 6 + [False] * 4)
    torch.testing.assert_close(self_labeling_loss(q, logits, valid), F.cross_entropy(logits[:6], q[:6]))
    self_labeling_loss(q, logits).backward()
    assert logits.grad is not None


def test_kl_terms_match_direct_formulas():
    logits_w = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(7))
    logits_s = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(8))
    mask = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(9)) > 0.3
    p_w, p_s = torch.softmax(logits_w.double(), 1), torch.softmax(logits_s.double(), 1)
    kl_ws = (p_w * (p_w.log() - p_s.log())).sum(1)
    kl_sw = (p_s * (p_s.log() - p_w.log())).sum(1)
    classes = logits_w.shape[1]
    torch.testing.assert_close(
        one_way_kl(logits_w, logits_s, mask).double(), kl_ws[mask].mean() / classes, rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        symmetric_kl(logits_w, logits_s, mask).double(),
        (kl_ws + kl_sw)[mask].mean() / classes,
        rtol=1e-5,
        atol=0,
    )
    # The reference: F.kl_div(log P_s, P_w, reduction="none") masked over all N x C x h x w elements and divided
    # by the mask's sum, so a mean over classes too (its lambda_2 = 5 is tuned for that scale).
    elementwise = F.kl_div(F.log_softmax(logits_s, 1), p_w.float(), reduction="none")
    element_mask = mask[:, None].expand_as(elementwise).float()
    reference = (elementwise * element_mask).sum() / element_mask.sum()
    torch.testing.assert_close(one_way_kl(logits_w, logits_s, mask), reference)


def test_masked_cross_entropy_is_the_mean_over_labelled_pixels_and_zero_without_any():
    logits = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(11), requires_grad=True)
    labels = torch.randint(0, 5, (2, 3, 3), generator=torch.Generator().manual_seed(12))
    labels[0, :2] = 255
    torch.testing.assert_close(
        masked_cross_entropy(logits, labels), F.cross_entropy(logits, labels, ignore_index=255)
    )
    nothing = masked_cross_entropy(logits, torch.full_like(labels, 255))
    nothing.backward()
    assert nothing.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_rce_and_symmetric_ce_match_reference_formula():
    logits = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(10))
    labels = torch.randint(0, 5, (2, 4, 4), generator=torch.Generator().manual_seed(11))
    labels[0, 0] = IGNORE
    labelled = labels != IGNORE
    probs = torch.softmax(logits, 1)
    one_hot = F.one_hot(torch.where(labelled, labels, 0), 5).permute(0, 3, 1, 2).float().clamp(1e-4, 1.0)
    expected_rce = -(probs * one_hot.log()).sum(1)[labelled].mean()
    torch.testing.assert_close(rce_loss(logits, labels), expected_rce)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    torch.testing.assert_close(symmetric_ce_loss(logits, labels, 0.1, 1.0), 0.1 * ce + expected_rce)
