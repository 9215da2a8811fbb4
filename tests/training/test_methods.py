"""The adaptation step against independent computations: the mean-teacher baseline, each pseudo-label source, the
reference consistency (it never trains the prototypes), the prototypes' optimiser, and the ground-truth
diagnostics (they can never reach a loss)."""

import json

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
    perturb_,
    prepared,
    probabilities,
    run,
    step_and_views,
    tiny_argv,
)

from cpsl_hf.data.transforms import normalize, warp_to_view
from cpsl_hf.training.arguments import ConfigurationError, parse_args
from cpsl_hf.training.diagnostics import PseudoLabelMonitor, PseudoLabelRecord, confusion_summary
from cpsl_hf.training.loop import Trainer
from cpsl_hf.training.pseudo_labels import OfflinePseudoLabels
from cpsl_hf.training.views import labels_to_strong_view

IGNORE = 255


# ---------------------------------------------------------------------------------------------- mean teacher
@pytest.mark.parametrize(("quantile", "resolution"), [(None, "crop"), (0.5, "crop"), (0.5, "decode")])
def test_mean_teacher_trains_on_argmax_p_st_above_its_threshold(
    tmp_path, synthetic_cache, quantile, resolution
):
    trainer = prepared(
        tmp_path / "run", synthetic_cache, "--method", "mean_teacher", "--consistency", "symmetric",
        "--pseudo_label_threshold", "0.5", "--pseudo_label_resolution", resolution,
    )  # fmt: skip
    assert trainer.args.cpsl.pseudo_label_threshold == 0.5
    assert adaptation(trainer).self_labeling is None  # no self-labeling core at all
    warmup = {name: value.clone() for name, value in trainer.student.state_dict().items()}
    source, target, _ = batches(trainer)
    # The threshold that drops about half of this (barely warmed-up) model's pixels, or none.
    state = trainer.views.generator.get_state()
    trainer.views.source(source)  # the step draws the source crop first
    weak, _ = trainer.views.target(target)
    trainer.views.generator.set_state(state)
    confidence = probabilities(independent_model(trainer, warmup), weak.images).max(dim=1).values
    threshold = 0.0 if quantile is None else float(confidence.quantile(quantile))
    trainer.args.cpsl.pseudo_label_threshold = threshold
    losses, record, (source_view, weak, strong) = step_and_views(trainer, source, target)
    assert "loss_sl" not in losses and "changed_share" not in losses

    p_st = probabilities(independent_model(trainer, warmup), weak.images)  # frozen warm-up model (default)
    decode = p_st.shape[-2:]
    crop = weak.images.shape[-2:]
    valid = nearest(weak.valid_mask, decode)
    if resolution == "crop":  # P_ST upsampled bilinearly to the crop, labels and loss there
        p_st = F.interpolate(p_st, size=tuple(crop), mode="bilinear", align_corners=False)
        valid = nearest(valid, crop) & weak.valid_mask
    size = p_st.shape[-2:]
    assert tuple(size) == tuple(crop if resolution == "crop" else decode) and tuple(crop) != tuple(decode)
    confidence, argmax = p_st.max(dim=1)
    expected_weak = torch.where(valid & (confidence > threshold), argmax, IGNORE)
    torch.testing.assert_close(record.pseudo_labels, expected_weak, rtol=0, atol=0)
    dropped = (expected_weak == IGNORE).sum() - (~valid).sum()
    assert (dropped > 0) == (quantile is not None)  # the threshold really drops pixels

    labels_strong, _ = warp_to_view(expected_weak, strong.params, tuple(size), mode="nearest", fill=IGNORE)
    cutout = nearest(strong.cutout_mask, size)
    assert cutout.any()
    labels_strong[cutout] = IGNORE  # --cutout_labels ignore (the default): the student does not see them
    with torch.no_grad():
        logits = trainer.student(normalize(torch.cat([source_view.images, strong.images]))).logits
    target_logits = F.interpolate(
        logits[source_view.images.shape[0] :], size=tuple(size), mode="bilinear", align_corners=False
    )
    expected = F.cross_entropy(target_logits, labels_strong, ignore_index=IGNORE)
    torch.testing.assert_close(losses["loss_target"], expected, rtol=1e-5, atol=1e-6)


def test_cutout_labels_keep_trains_on_the_labels_inside_the_box(tmp_path, synthetic_cache):
    losses = {}
    for mode in ("ignore", "keep"):
        trainer = prepared(tmp_path / mode, synthetic_cache, "--cutout_labels", mode)
        source, target, _ = batches(trainer)
        _, _, (_, weak, strong) = step_and_views(trainer, source, target)
        labels = labels_to_strong_view(
            torch.zeros(weak.images.shape[0], 8, 8, dtype=torch.long),
            strong,
            (8, 8),
            ignore_cutout=adaptation(trainer).ignore_cutout,
        )
        cutout = F.interpolate(strong.cutout_mask[:, None].float(), size=(8, 8), mode="nearest")[:, 0] > 0.5
        inside_view = (
            F.interpolate(strong.valid_mask[:, None].float(), size=(8, 8), mode="nearest")[:, 0] > 0.5
        )
        assert cutout.any()
        if mode == "ignore":
            assert bool((labels[cutout] == IGNORE).all())
        else:
            assert bool((labels[cutout & inside_view] == 0).all())
        assert bool((labels[~cutout & inside_view] == 0).all())
        losses[mode] = cpsl_losses(trainer, source, target)[0]["loss_target"]
    assert float(losses["ignore"]) != pytest.approx(float(losses["keep"]))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_teacher_mode_sets_the_teachers_forward_and_restores_eval(tmp_path, synthetic_cache, mode):
    trainer = prepared(tmp_path / "run", synthetic_cache, "--teacher_mode", mode)
    seen = []
    hook = adaptation(trainer).teacher.module.decode_head.register_forward_pre_hook(
        lambda module, _: seen.append(module.training)
    )
    source, target, _ = batches(trainer)
    cpsl_losses(trainer, source, target)
    hook.remove()
    assert seen == [mode == "train"]
    assert not adaptation(trainer).teacher.module.training  # eval again afterwards (evaluation, checkpoints)


def test_mean_teacher_refuses_the_self_labeling_options(tmp_path, synthetic_cache):
    for flags in (
        ["--consistency", "reference"],
        ["--sl_logits_branch"],
        ["--sl_grad_to_student_embeddings"],
    ):
        with pytest.raises(ConfigurationError, match="mean_teacher"):
            parse_args(tiny_argv(tmp_path, synthetic_cache, "--method", "mean_teacher", *flags))


# ---------------------------------------------------------------------------------------------- P_ST sources
@pytest.mark.parametrize("source_name", ["frozen", "teacher", "offline"])
def test_each_pseudo_label_source_gives_its_own_p_st(tmp_path, synthetic_cache, source_name):
    trainer = prepared(tmp_path / "run", synthetic_cache, "--pseudo_labels", source_name)
    warmup = {name: value.clone() for name, value in trainer.student.state_dict().items()}
    perturb_(adaptation(trainer).teacher.module, seed=1)  # the teacher has moved away from the warm-up model
    teacher = {name: value.clone() for name, value in adaptation(trainer).teacher.module.state_dict().items()}
    source, target, _ = batches(trainer)
    _, record, (_, weak, _) = step_and_views(trainer, source, target)

    if source_name == "teacher":
        p_st = probabilities(independent_model(trainer, teacher), weak.images)
    else:  # frozen and offline: the warm-up model (offline: on the full image, stored, then warped)
        model = independent_model(trainer, warmup)
        if source_name == "frozen":
            p_st = probabilities(model, weak.images)
            assert adaptation(trainer).pseudo_label_model is not None
        else:
            full = probabilities(model, target["pixel_values"].float() / 255)
            decode = tuple(probabilities(model, weak.images).shape[-2:])  # stored maps are warped there
            p_st, _ = warp_to_view(full.half().float(), weak.params, decode, mode="bilinear")
    valid = record.valid
    p_st = F.interpolate(p_st, size=tuple(valid.shape[-2:]), mode="bilinear", align_corners=False)
    expected = torch.where(valid, p_st.argmax(dim=1), IGNORE)
    agree = (record.p_st_labels == expected).float().mean()
    if source_name == "offline":  # float16 storage and renormalisation may flip near-ties only
        assert agree > 0.999
    else:
        torch.testing.assert_close(record.p_st_labels, expected, rtol=0, atol=0)
    # ... and it is not what the other source would have given.
    other = teacher if source_name != "teacher" else warmup
    other_p_st = F.interpolate(
        probabilities(independent_model(trainer, other), weak.images),
        size=tuple(valid.shape[-2:]),
        mode="bilinear",
        align_corners=False,
    )
    other_labels = torch.where(valid, other_p_st.argmax(1), IGNORE)
    assert other_labels.shape == record.p_st_labels.shape
    assert not torch.equal(record.p_st_labels, other_labels)


def test_cpsl_labels_at_the_crop_are_the_rectified_product_of_the_upsampled_maps(tmp_path, synthetic_cache):
    trainer = prepared(tmp_path / "run", synthetic_cache)  # defaults: frozen P_ST, labels at the crop
    warmup = {name: value.clone() for name, value in trainer.student.state_dict().items()}
    perturb_(adaptation(trainer).teacher.module, seed=5)
    source, target, _ = batches(trainer)
    _, record, (_, weak, _) = step_and_views(trainer, source, target)
    crop = tuple(weak.images.shape[-2:])
    with torch.no_grad():
        z, _ = adaptation(trainer).teacher.module.encode(normalize(weak.images))
        w_prime = F.normalize(adaptation(trainer).teacher.module.self_labeling_head.prototypes, dim=1)
        p_sl = (torch.einsum("ndhw,cd->nchw", F.normalize(z, dim=1), w_prime) / 0.08).softmax(1)
    p_st = probabilities(independent_model(trainer, warmup), weak.images)

    def up(maps):
        return F.interpolate(maps, size=crop, mode="bilinear", align_corners=False)

    valid = nearest(nearest(weak.valid_mask, p_st.shape[-2:]), crop) & weak.valid_mask
    expected = torch.where(valid, (up(p_sl) * up(p_st)).argmax(1), IGNORE)
    assert record.pseudo_labels.shape[-2:] == crop
    assert (record.pseudo_labels == expected).float().mean() > 0.999  # float ties aside
    assert not torch.equal(expected, torch.where(valid, up(p_st).argmax(1), IGNORE))  # rectification acted


def test_offline_p_st_is_stored_in_float16_and_keeps_small_probabilities():
    probs = torch.softmax(torch.randn(2, 19, 4, 6) * 4, dim=1)
    probs[0, 3, 0, 0] = 1e-4  # below 1/255: uint8 quantisation would zero it
    probs[0, :, 0, 0] /= probs[0, :, 0, 0].sum()
    stored = OfflinePseudoLabels(["a", "b"], OfflinePseudoLabels.compress(probs))
    assert stored.probabilities.dtype == torch.float16
    restored = OfflinePseudoLabels.from_state_dict(stored.state_dict())
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]).repeat(2, 1, 1)
    looked_up, valid = restored.lookup(["b", "a"], identity, (4, 6), "cpu")
    assert bool(valid.all())
    torch.testing.assert_close(looked_up, probs[[1, 0]], rtol=2e-3, atol=1e-6)
    assert looked_up[1, 3, 0, 0] > 0.9e-4
    torch.testing.assert_close(looked_up.sum(1), torch.ones(2, 4, 6))
    with pytest.raises(KeyError, match="zz"):
        restored.lookup(["zz"], identity[:1], (4, 6), "cpu")


# ---------------------------------------------------------------------------------------------- consistency
def test_reference_consistency_is_the_sl_head_kl_to_w_prime_and_never_trains_w(tmp_path, synthetic_cache):
    common = ("--consistency", "reference", "--lambda_sl", "0")
    trainer = prepared(tmp_path / "run", synthetic_cache, *common)
    perturb_(adaptation(trainer).teacher.module, seed=2)  # W' != W and teacher != student
    student_w = trainer.student.self_labeling_head.prototypes
    with torch.no_grad():
        student_w.add_(0.3 * torch.randn(student_w.shape, generator=torch.Generator().manual_seed(3)))
    w_prime = adaptation(trainer).teacher.module.self_labeling_head.prototypes
    tau = trainer.student.config.sl_temperature
    source, target, _ = batches(trainer)
    losses, _, (source_view, weak, strong) = step_and_views(trainer, source, target)

    with torch.no_grad():
        z_teacher, _ = adaptation(trainer).teacher.module.encode(normalize(weak.images))
        size = tuple(z_teacher.shape[-2:])
        scores_w = (
            torch.einsum("ndhw,cd->nchw", F.normalize(z_teacher, dim=1), F.normalize(w_prime, dim=1)) / tau
        )
        weak_valid = F.interpolate(weak.valid_mask[:, None].float(), size=size, mode="nearest")[:, 0]
        warped, inside = warp_to_view(torch.cat([scores_w, weak_valid[:, None]], 1), strong.params, size)
        out = trainer.student(
            normalize(torch.cat([source_view.images, strong.images])), output_embeddings=True
        )
        z_student = out.embeddings[source_view.images.shape[0] :]
        scores_s = (
            torch.einsum("ndhw,cd->nchw", F.normalize(z_student, dim=1), F.normalize(w_prime, dim=1)) / tau
        )

    def small(mask):
        return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5

    mask = inside & (warped[:, -1] > 0.5) & small(strong.valid_mask) & ~small(strong.cutout_mask)
    assert 0 < mask.float().mean() < 1  # the cutout and the borders are really excluded
    p_w = warped[:, :-1].softmax(1)
    kl = (p_w * (p_w.log() - scores_s.log_softmax(1))).mean(1)
    torch.testing.assert_close(losses["loss_reg"], kl[mask].mean(), rtol=1e-4, atol=1e-6)

    # Its gradient reaches the student's features but never W (lambda_sl = 0: L_SL is off).
    trainer.student.zero_grad(set_to_none=True)
    losses, _ = cpsl_losses(trainer, source, target)
    losses["loss"].backward()
    assert student_w.grad is None or not student_w.grad.any()
    assert trainer.student.decode_head.linear_fuse.weight.grad.abs().sum() > 0
    assert not w_prime.requires_grad and w_prime.grad is None


def test_consistency_options_change_the_loss(tmp_path, synthetic_cache):
    values = {}
    for mode in ("reference", "symmetric", "none"):
        trainer = prepared(tmp_path / mode, synthetic_cache, "--consistency", mode)
        perturb_(adaptation(trainer).teacher.module, seed=4)
        source, target, _ = batches(trainer)
        losses, _ = cpsl_losses(trainer, source, target)
        values[mode] = losses
    assert "loss_reg" not in values["none"]
    assert float(values["reference"]["loss_reg"]) != pytest.approx(float(values["symmetric"]["loss_reg"]))
    for mode in (
        "reference",
        "symmetric",
    ):  # the same step otherwise: loss = L_src + L_tgt + 0.1 L_SL + 5 L_REG
        parts = values[mode]
        total = parts["loss_source"] + parts["loss_target"] + 0.1 * parts["loss_sl"] + 5.0 * parts["loss_reg"]
        torch.testing.assert_close(parts["loss"].detach(), total, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- W's optimiser
def _prototype_update(tmp_path, cache, *flags):
    trainer = prepared(tmp_path, cache, "--consistency", "none", *flags)
    w = trainer.student.self_labeling_head.prototypes
    before = w.detach().clone()
    source, target, _ = batches(trainer)
    losses, _ = cpsl_losses(trainer, source, target)
    losses["loss"].backward()
    grad = w.grad.detach().clone()
    for optimizer in trainer.optimizers():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return w.detach() - before, grad, trainer


def test_sgd_prototypes_move_with_lambda_sl_and_adamw_cancels_it(tmp_path, synthetic_cache):
    sgd = {}
    for weight in ("0.1", "0.2"):
        delta, grad, trainer = _prototype_update(
            tmp_path / f"sgd{weight}", synthetic_cache, "--lambda_sl", weight, "--prototype_lr", "0.05"
        )
        assert trainer.prototype_optimizer is not None  # its own SGD beside the network's AdamW
        assert all(g["name"] != "prototypes" for g in trainer.optimizer.optimizer.param_groups)
        torch.testing.assert_close(delta, -0.05 * grad, rtol=1e-4, atol=1e-7)  # first SGD step: -lr * grad
        sgd[weight] = delta
    torch.testing.assert_close(sgd["0.2"], 2 * sgd["0.1"], rtol=1e-3, atol=1e-7)

    adam = {}
    for weight in ("0.1", "0.2"):
        delta, _, trainer = _prototype_update(
            tmp_path / f"adam{weight}",
            synthetic_cache,
            "--lambda_sl",
            weight,
            "--prototype_optimizer",
            "adamw",
        )
        assert trainer.prototype_optimizer is None
        adam[weight] = delta
    # Adam's first step is lr * g / (|g| + eps): the weight of the loss cancels (but where |g| ~ eps).
    assert (adam["0.2"] - adam["0.1"]).norm() < 0.05 * adam["0.1"].norm()
    assert (sgd["0.2"] - sgd["0.1"]).norm() > 0.9 * sgd["0.1"].norm()


# ---------------------------------------------------------------------------------------------- diagnostics
@pytest.mark.parametrize("kinds", [2, 3])
def test_pseudo_label_monitor_against_an_independent_confusion(kinds):
    rng = np.random.default_rng(0)
    monitor = PseudoLabelMonitor(4, "cpu")
    expected = np.zeros((kinds, 4, 4), dtype=np.int64)
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]).repeat(2, 1, 1)
    for _ in range(3):
        truth = torch.from_numpy(rng.integers(0, 4, (2, 8, 12)))
        truth[0, 0] = IGNORE
        p_st = torch.from_numpy(rng.integers(0, 4, (2, 4, 6)))
        labels = torch.from_numpy(rng.integers(0, 4, (2, 4, 6)))
        labels[1, :2] = IGNORE
        valid = torch.ones(2, 4, 6, dtype=torch.bool)
        valid[:, :, -1] = False
        record = PseudoLabelRecord(params=identity, p_st_labels=p_st, pseudo_labels=labels, valid=valid)
        if kinds == 3:
            record.p_sl_labels = p_sl = torch.from_numpy(rng.integers(0, 4, (2, 4, 6)))
        monitor.update("cpsl", truth, record)
        small = truth[:, 1::2, 1::2].numpy()  # nearest of 8 x 12 at 4 x 6: centres at odd pixels
        maps = (p_st, labels) if kinds == 2 else (p_st, p_sl, labels)
        for kind, predicted in enumerate(m.numpy() for m in maps):
            keep = valid.numpy() & (small != IGNORE) & (predicted != IGNORE)
            np.add.at(expected[kind], (small[keep], predicted[keep]), 1)
    window = monitor.window_summary()
    stage = monitor.stage_summary("cpsl")
    names = ("p_st", "pseudo_labels") if kinds == 2 else ("p_st", "p_sl", "pseudo_labels")
    assert set(stage) == set(names)  # a kind that was never recorded is left out
    for kind, name in enumerate(names):
        matrix = expected[kind].astype(float)
        iou = np.diag(matrix) / (matrix.sum(0) + matrix.sum(1) - np.diag(matrix))
        assert window[f"pseudo_{name}_miou"] == pytest.approx(iou.mean())
        assert window[f"pseudo_{name}_accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
        np.testing.assert_allclose(stage[name]["per_category_iou"], iou)
        assert stage[name]["pixels"] == matrix.sum()
    assert window["pseudo_labels_share"] == pytest.approx(expected[-1].sum() / expected[0].sum())
    assert monitor.window_summary() == {}  # the window restarts; the stage keeps its totals
    assert monitor.stage_summary("cpsl")["p_st"]["pixels"] == expected[0].sum()
    assert confusion_summary(torch.zeros(3, 3))["mean_iou"] is None


class CorruptedTruth(Trainer):
    """The target's ground truth replaced by other labels: nothing but the diagnostics may change."""

    def next_batch(self, loader):
        batch = super().next_batch(loader)
        if loader is self.target_loader:
            batch["labels"] = (batch["labels"] * 7 + 3) % self.num_classes
        return batch


def test_the_target_ground_truth_never_reaches_a_loss(tmp_path, synthetic_cache):
    common = ("--deterministic", "--cpsl_steps", "3", "--save_predictions", "0")
    runs = {
        "true": run(tiny_argv(tmp_path / "true", synthetic_cache, *common)),
        "corrupted": run(tiny_argv(tmp_path / "corrupted", synthetic_cache, *common), CorruptedTruth),
        "off": run(tiny_argv(tmp_path / "off", synthetic_cache, *common, "--no_pseudo_label_diagnostics")),
    }
    reference = runs["true"].student.state_dict()
    for name in ("corrupted", "off"):
        for key, tensor in runs[name].student.state_dict().items():
            torch.testing.assert_close(tensor, reference[key], rtol=0, atol=0, msg=f"{name}: {key}")
        torch.testing.assert_close(
            adaptation(runs[name]).self_labeling.bank.embeddings,
            adaptation(runs["true"]).self_labeling.bank.embeddings,
            rtol=0,
            atol=0,
        )
    diagnostics = {
        name: json.loads((tmp_path / name / "metrics.json").read_text())["pseudo_labels"]
        for name in ("true", "corrupted", "off")
    }
    assert diagnostics["off"] == {}
    assert runs["off"].pseudo_label_monitor is None
    true_stage, corrupted_stage = diagnostics["true"]["cpsl"], diagnostics["corrupted"]["cpsl"]
    assert true_stage["p_st"]["pixels"] == corrupted_stage["p_st"]["pixels"] > 0
    assert true_stage["p_st"]["per_category_iou"] != corrupted_stage["p_st"]["per_category_iou"]
