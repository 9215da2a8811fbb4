"""Each option of the adaptation step by its effect, and the CPSL initialisation against an independent
computation: an option the trainer could silently ignore fails here."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from training_helpers import (
    adaptation,
    batches,
    cpsl_losses,
    independent_model,
    nearest,
    prepared,
    probabilities,
    step_and_views,
    tiny_argv,
)

from cpsl_hf.data.synthetic import load_synthetic
from cpsl_hf.data.transforms import normalize, to_float, warp_to_view
from cpsl_hf.selflabel import class_balanced_sample

IGNORE = 255


def spy_on_self_labeling(trainer):
    """Record every SelfLabelingOutput of the trainer's core."""
    outputs = []
    forward = adaptation(trainer).self_labeling.forward

    def recorded(*args, **kwargs):
        out = forward(*args, **kwargs)
        outputs.append(out)
        return out

    adaptation(trainer).self_labeling.forward = recorded
    return outputs


@pytest.mark.parametrize("sampling", ["class_balanced", "uniform"])
def test_sampling_option_chooses_the_sampler(tmp_path, synthetic_cache, sampling):
    trainer = prepared(tmp_path / "run", synthetic_cache, "--sampling", sampling)
    outputs = spy_on_self_labeling(trainer)
    source, target, _ = batches(trainer)
    cpsl_losses(trainer, source, target)
    out = outputs[0]
    # Per image and class, the class-balanced quotas are the largest-remainder apportionment of the labels.
    quota_indices, _ = class_balanced_sample(
        out.labels, trainer.args.cpsl.samples_per_image, IGNORE, num_classes=19
    )
    flat = out.labels.flatten(1)

    def counts(indices):
        drawn = flat.gather(1, indices)
        return torch.stack([torch.bincount(row, minlength=256)[:19] for row in drawn])

    matches = torch.equal(counts(out.sample_indices), counts(quota_indices))
    assert matches == (sampling == "class_balanced")
    assert bool((flat.gather(1, out.sample_indices)[out.sample_valid] != IGNORE).all())


def test_logits_branch_runs_a_second_sinkhorn_and_fills_its_bank(tmp_path, synthetic_cache):
    plain = prepared(tmp_path / "plain", synthetic_cache)
    branch = prepared(tmp_path / "branch", synthetic_cache, "--sl_logits_branch")
    assert adaptation(plain).self_labeling.logits_bank is None
    results = {}
    for name, trainer in (("plain", plain), ("branch", branch)):
        outputs = spy_on_self_labeling(trainer)
        source, target, _ = batches(trainer)
        results[name] = (cpsl_losses(trainer, source, target)[0], outputs[0])
    (plain_losses, plain_out), (branch_losses, branch_out) = results["plain"], results["branch"]
    assert plain_out.q_logits is None and branch_out.q_logits is not None
    assert bool(adaptation(branch).self_labeling.logits_bank.valid.any())
    torch.testing.assert_close(branch_out.q, plain_out.q)  # the embedding branch is the same ...
    assert float(branch_losses["loss_sl"]) > float(plain_losses["loss_sl"]) + 1e-3  # ... plus a second term


def test_symmetric_ce_target_loss_is_a_tenth_ce_plus_rce(tmp_path, synthetic_cache):
    trainer = prepared(
        tmp_path / "run", synthetic_cache, "--method", "mean_teacher", "--consistency", "symmetric",
        "--target_loss", "ce+rce",
    )  # fmt: skip
    source, target, _ = batches(trainer)
    losses, record, (source_view, _, strong) = step_and_views(trainer, source, target)
    size = record.pseudo_labels.shape[-2:]
    labels, _ = warp_to_view(record.pseudo_labels, strong.params, tuple(size), mode="nearest", fill=IGNORE)
    labels[nearest(strong.cutout_mask, size)] = IGNORE
    with torch.no_grad():
        logits = trainer.student(normalize(torch.cat([source_view.images, strong.images]))).logits
    logits = F.interpolate(logits[source_view.images.shape[0] :], size=tuple(size), mode="bilinear")
    labelled = labels != IGNORE
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    p_label = logits.softmax(1).gather(1, labels.clamp_max(18)[:, None])[:, 0]
    rce = (-np.log(1e-4) * (1 - p_label))[labelled].mean()
    torch.testing.assert_close(losses["loss_target"], 0.1 * ce + rce, rtol=1e-5, atol=1e-6)


def _backbone_gradients(tmp_path, cache, *flags):
    trainer = prepared(tmp_path, cache, "--consistency", "none", *flags)
    source, target, _ = batches(trainer)
    losses, _ = cpsl_losses(trainer, source, target)
    losses["loss"].backward()
    return {
        name: p.grad.clone() for name, p in trainer.student.backbone.named_parameters() if p.grad is not None
    }


def test_sl_gradient_reaches_the_student_only_with_the_option(tmp_path, synthetic_cache):
    default = _backbone_gradients(tmp_path / "a", synthetic_cache)
    without_sl = _backbone_gradients(tmp_path / "b", synthetic_cache, "--lambda_sl", "0")
    with_option = _backbone_gradients(tmp_path / "c", synthetic_cache, "--sl_grad_to_student_embeddings")
    option_without_sl = _backbone_gradients(
        tmp_path / "d", synthetic_cache, "--sl_grad_to_student_embeddings", "--lambda_sl", "0"
    )
    for name, grad in default.items():  # by default L_SL never reaches the network
        torch.testing.assert_close(grad, without_sl[name], rtol=1e-5, atol=1e-8, msg=name)
    # with the option it does (the extra weak-view pass alone changes nothing: compare at lambda_sl 0)
    difference = sum(float((with_option[n] - option_without_sl[n]).abs().sum()) for n in with_option)
    assert difference > 1e-6


def test_sgd_network_optimizer_takes_a_plain_sgd_step(tmp_path, synthetic_cache):
    trainer = prepared(tmp_path / "run", synthetic_cache, "--optimizer", "sgd", "--learning_rate", "0.01")
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)
    assert trainer.prototype_optimizer is None  # W in the same SGD (its own group, no weight decay)
    weight = trainer.student.decode_head.classifier.weight
    before = weight.detach().clone()
    source, target, _ = batches(trainer)
    losses, _ = cpsl_losses(trainer, source, target)
    losses["loss"].backward()
    grad = weight.grad.detach().clone()
    trainer.optimizer.step()
    # first SGD step with momentum: buffer = grad + weight decay; w -= lr * buffer
    expected = before - 0.01 * (grad + trainer.args.training.weight_decay * before)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ramp", [False, True])
def test_ema_ramp_makes_the_first_update_copy_the_student(tmp_path, synthetic_cache, ramp):
    from training_helpers import run

    flags = ("--warmup_steps", "1", "--cpsl_steps", "1", "--save_predictions", "0", "--eval_teacher", "false")
    trainer = run(tiny_argv(tmp_path / "run", synthetic_cache, *flags, *(["--ema_ramp"] if ramp else [])))
    student, teacher = trainer.student.state_dict(), adaptation(trainer).teacher.module.state_dict()
    equal = all(torch.equal(student[name], teacher[name]) for name in student)
    assert equal == ramp  # min(1 - 1/1, m) = 0: the teacher becomes the student; m = 0.99 moves it 1%


def test_cpsl_initialisation_against_class_means_over_the_target_set(tmp_path, synthetic_cache):
    trainer = prepared(tmp_path / "run", synthetic_cache)
    warmup = {name: value.clone() for name, value in trainer.student.state_dict().items()}
    model = independent_model(trainer, warmup)
    dataset = load_synthetic(
        "target", "train", num_images=8, image_size=(32, 64), seed=0, cache_dir=synthetic_cache
    )
    sums, counts, histogram = torch.zeros(19, 128, dtype=torch.float64), torch.zeros(19), torch.zeros(19)
    for sample in dataset:
        pixels = torch.from_numpy(np.asarray(sample["image"]).copy()).permute(2, 0, 1)[None]
        with torch.no_grad():
            out = model(normalize(to_float(pixels)), output_embeddings=True)
        labels = out.logits.argmax(1).flatten()
        z = out.embeddings[0].flatten(1).t().double()
        for c in labels.unique().tolist():
            sums[c] += z[labels == c].sum(0)
            counts[c] += int((labels == c).sum())
        histogram += torch.bincount(labels, minlength=19).float()
    seen = counts > 0
    assert not bool(seen.all())  # some class no pixel was assigned to: the fallback is exercised
    means = F.normalize(sums[seen] / counts[seen, None], dim=1).float()
    prototypes = trainer.student.self_labeling_head.prototypes.detach()
    torch.testing.assert_close(prototypes[seen], means, rtol=1e-4, atol=1e-5)
    # An unseen class keeps its random initial prototype, normalised.
    initial = F.normalize(model.self_labeling_head.prototypes.detach(), dim=1)
    torch.testing.assert_close(prototypes[~seen], initial[~seen], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        adaptation(trainer).teacher.module.self_labeling_head.prototypes.detach(), prototypes
    )
    # The prior: the histogram of argmax P_ST with +1 per class (no class starts with zero mass).
    expected_prior = (histogram + 1) / (histogram + 1).sum()
    torch.testing.assert_close(
        adaptation(trainer).self_labeling.prior.distribution, expected_prior, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("prior", ["dynamic", "static", "uniform"])
def test_prior_option_sets_the_sinkhorn_marginal_and_its_updates(tmp_path, synthetic_cache, prior):
    trainer = prepared(tmp_path / "run", synthetic_cache, "--prior", prior)
    initial = adaptation(trainer).self_labeling.prior.distribution.clone()
    uniform = torch.full((19,), 1 / 19)
    # dynamic and static start at the histogram of argmax P_ST (+1, far from uniform here); uniform at 1/C.
    assert torch.allclose(initial, uniform, rtol=0, atol=1e-7) == (prior == "uniform")
    for _ in range(2):
        source, target, _ = batches(trainer)
        cpsl_losses(trainer, source, target)
    after = adaptation(trainer).self_labeling.prior.distribution
    assert torch.equal(after, initial) == (prior != "dynamic")
    torch.testing.assert_close(after.sum(), torch.tensor(1.0))


def test_frozen_p_st_model_is_the_warm_up_model_and_never_trains(tmp_path, synthetic_cache):
    trainer = prepared(tmp_path / "run", synthetic_cache)
    frozen = adaptation(trainer).pseudo_label_model
    warmup = trainer.student.state_dict()
    for name, tensor in frozen.state_dict().items():
        assert torch.equal(tensor, warmup[name]), name
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    source, target, _ = batches(trainer)
    _, _, (_, weak, _) = step_and_views(trainer, source, target)
    expected = probabilities(independent_model(trainer, frozen.state_dict()), weak.images)
    with torch.no_grad():
        torch.testing.assert_close(probabilities(frozen, weak.images), expected)
