"""The loop and its stages: each stage's loss against a direct computation, the loop's accumulate / data-parallel
arithmetic against one large batch, resumes across a stage boundary (one and two processes), and a new stage
added from outside the package."""

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from example_stages import EntropyStage, ImageMeanStage, add_entropy_stage, student_state
from training_helpers import (
    FINAL_STATE_DRIVER,
    REPOSITORY,
    adaptation,
    batches,
    nearest,
    perturb_,
    run,
    run_two_processes,
    stage_named,
    tiny_argv,
)

from cpsl_hf.data.transforms import normalize, warp_to_view
from cpsl_hf.training import stages as stage_registry
from cpsl_hf.training.arguments import parse_args
from cpsl_hf.training.checkpointing import find_latest_checkpoint
from cpsl_hf.training.loop import Trainer

IGNORE = 255


def _assert_states_equal(
    actual: dict, expected: dict, what: str, rtol: float = 0.0, atol: float = 0.0
) -> None:
    assert actual.keys() == expected.keys(), what
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=rtol, atol=atol, msg=f"{what}: {name}")


def _set_up(tmp_path, cache, *flags) -> Trainer:
    trainer = Trainer(parse_args(tiny_argv(tmp_path, cache, "--save_predictions", "0", *flags)))
    trainer.setup()
    trainer.model.eval()  # deterministic forwards (no dropout / drop path), recomputable below
    return trainer


def _views_of(trainer: Trainer, step, *batches_in):
    """Run ``step`` and redraw the views it drew from the same generator state: (result, views)."""
    generator = trainer.views.generator
    state = generator.get_state()
    result = step()
    after = generator.get_state()
    generator.set_state(state)
    views = []
    for kind, batch in batches_in:
        views.extend([trainer.views.source(batch)] if kind == "source" else trainer.views.target(batch))
    generator.set_state(after)
    return result, views


# ------------------------------------------------------------------------------------------------ stage losses
def test_warmup_loss_is_the_cross_entropy_of_the_source_crop(tmp_path, synthetic_cache):
    trainer = _set_up(tmp_path, synthetic_cache)
    stage = stage_named(trainer, "warmup")
    source = trainer.next_batch(trainer.source_loader)
    output, (view,) = _views_of(trainer, lambda: stage.losses(source, None), ("source", source))
    with torch.no_grad():
        logits = trainer.student(normalize(view.images)).logits
    upsampled = F.interpolate(
        logits, size=tuple(view.labels.shape[-2:]), mode="bilinear", align_corners=False
    )
    expected = F.cross_entropy(upsampled, view.labels, ignore_index=IGNORE)
    assert tuple(view.images.shape[-2:]) == (32, 32) and bool((view.labels != IGNORE).any())
    torch.testing.assert_close(output.losses["loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.losses["loss_source"], expected, rtol=1e-5, atol=1e-6)
    assert output.pseudo_labels is None and set(output.losses) == {"loss", "loss_source"}


@pytest.mark.parametrize("thresholded", [False, True])
def test_distill_loss_is_source_ce_plus_hard_label_ce_plus_kl(tmp_path, synthetic_cache, thresholded):
    flags = ("--distill_rounds", "1", "--distill_steps", "1", "--lambda_distill_kl", "0.7")
    trainer = _set_up(tmp_path, synthetic_cache, *flags)
    # The labeller (this model) differs from the fresh student (the initial weights).
    perturb_(trainer.student, seed=3)
    labeller = {name: value.clone() for name, value in trainer.student.state_dict().items()}
    stage = stage_named(trainer, "distill1")
    stage.start(stage_named(trainer, "warmup"))
    trainer.model.eval()
    source, target, _ = batches(trainer)
    threshold = 0.0
    if thresholded:  # the labeller's median confidence on the whole images: about half the pixels pass
        with torch.no_grad():
            images = normalize(target["pixel_values"].float() / 255)
            threshold = float(stage.previous_model(images).logits.softmax(dim=1).amax(dim=1).median())
    stage.threshold = threshold  # what --distill_threshold sets
    output, (source_view, weak, strong) = _views_of(
        trainer, lambda: stage.losses(source, target), ("source", source), ("target", target)
    )

    previous = type(trainer.student)(trainer.student.config)
    previous.load_state_dict(labeller)
    previous.eval()
    with torch.no_grad():
        plain = previous(normalize(weak.images)).logits.softmax(dim=1)
        mirrored = previous(normalize(weak.images.flip(-1))).logits.softmax(dim=1).flip(-1)
        logits = trainer.student(normalize(torch.cat([source_view.images, strong.images]))).logits
    p_prev = (plain + mirrored) / 2
    decode = tuple(p_prev.shape[-2:])
    weak_valid = nearest(weak.valid_mask, decode)
    confidence, argmax = p_prev.max(dim=1)
    labels_weak = torch.where((confidence > threshold) & weak_valid, argmax, IGNORE)
    labels_strong, _ = warp_to_view(labels_weak, strong.params, decode, mode="nearest", fill=IGNORE)
    labels_strong[nearest(strong.cutout_mask, decode)] = IGNORE
    warped, inside = warp_to_view(p_prev, strong.params, decode, mode="bilinear")
    warped_weak_valid, _ = warp_to_view(weak_valid[:, None].float(), strong.params, decode, mode="bilinear")
    kl_valid = inside & nearest(strong.valid_mask, decode) & (warped_weak_valid[:, 0] > 0.5)

    num_source = source_view.images.shape[0]
    target_logits = logits[num_source:]
    expected_target = F.cross_entropy(target_logits, labels_strong, ignore_index=IGNORE)
    log_prev = warped.clamp_min(1e-30).log()
    log_student = target_logits.log_softmax(dim=1)
    kl_per_pixel = (warped * (log_prev - log_student)).sum(dim=1) / p_prev.shape[1]
    expected_kl = kl_per_pixel[kl_valid].mean()
    source_logits = F.interpolate(logits[:num_source], size=(32, 32), mode="bilinear", align_corners=False)
    expected_source = F.cross_entropy(source_logits, source_view.labels, ignore_index=IGNORE)
    losses = output.losses
    torch.testing.assert_close(losses["loss_target"], expected_target, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_kl"], expected_kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["loss_source"], expected_source, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        losses["loss"], expected_source + expected_target + 0.7 * expected_kl, rtol=1e-5, atol=1e-6
    )
    share = (labels_weak != IGNORE).sum() / weak_valid.sum()
    torch.testing.assert_close(losses["pseudo_label_share"], share.float())
    assert (share < 1) == (threshold > 0)  # the threshold really drops pixels


# ------------------------------------------------------------------------------------------------ loop arithmetic
def _image_mean_argv(tmp_path, cache, *flags):
    """SGD without momentum (the update is linear in the gradient, unlike Adam's), W in the same optimiser."""
    return tiny_argv(
        tmp_path, cache, "--save_predictions", "0", "--optimizer", "sgd", "--sgd_momentum", "0",
        "--learning_rate", "0.05", "--target_batch_size", "1", *flags,
    )  # fmt: skip


def _image_mean_run(tmp_path, cache, *flags) -> dict[str, torch.Tensor]:
    trainer = Trainer(parse_args(_image_mean_argv(tmp_path, cache, *flags)), stages=[ImageMeanStage(2)])
    trainer.train()
    assert trainer.step == 2 and list(trainer.history) == ["image_mean"]
    return student_state(trainer)


IMAGE_MEAN_DRIVER = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, "{tests}")
    from example_stages import ImageMeanStage, student_state
    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    trainer = Trainer(parse_args(sys.argv[2:]), stages=[ImageMeanStage(2)])
    trainer.train()
    state = {{"student": student_state(trainer), "world": trainer.accelerator.num_processes}}
    torch.save(state, f"{{sys.argv[1]}}/rank{{trainer.accelerator.process_index}}.pt")
    """
).format(tests=REPOSITORY / "tests" / "training")


@pytest.mark.slow
def test_accumulation_and_two_processes_equal_one_large_batch(tmp_path, synthetic_cache):
    """2 steps of batch 2 = batch 1 with 2 accumulation steps = 2 processes x batch 1: the loop averages
    gradients over micro-batches and processes (W's, all-reduced by hand outside DDP, included) and steps the
    optimiser, schedule and step counter once per optimisation step."""
    large = _image_mean_run(tmp_path / "large", synthetic_cache, "--source_batch_size", "2")
    accumulated = _image_mean_run(
        tmp_path / "accumulated",
        synthetic_cache,
        "--source_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
    )
    argv = _image_mean_argv(tmp_path / "ddp" / "run", synthetic_cache, "--source_batch_size", "1")
    (tmp_path / "ddp").mkdir()
    run_two_processes(IMAGE_MEAN_DRIVER, tmp_path / "ddp", argv)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2

    initial = Trainer(parse_args(_image_mean_argv(tmp_path / "initial", synthetic_cache)))
    initial.setup()
    changed = [name for name, value in large.items() if not torch.equal(value, student_state(initial)[name])]
    assert "self_labeling_head.prototypes" in changed and len(changed) > 10  # the steps did train
    _assert_states_equal(accumulated, large, "accumulated vs one batch", rtol=1e-5, atol=1e-6)
    _assert_states_equal(ranks[0]["student"], ranks[1]["student"], "rank 0 vs rank 1")
    _assert_states_equal(ranks[0]["student"], large, "2 processes vs one batch", rtol=1e-5, atol=1e-6)


def _cpsl_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    cpsl = adaptation(trainer)
    state = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
    state.update({f"teacher.{k}": v for k, v in cpsl.teacher.module.state_dict().items()})
    state.update({f"selflabel.{k}": v for k, v in cpsl.self_labeling.state_dict().items()})
    for index, moments in trainer.optimizer.optimizer.state_dict()["state"].items():
        state.update({f"adam.{index}.{k}": v for k, v in moments.items()})
    return state


def test_resume_at_the_warmup_to_cpsl_boundary_equals_a_straight_run(tmp_path, synthetic_cache):
    """Stopped right after the warm-up's last step (checkpoint before the CPSL stage starts): the resumed run
    initialises the CPSL stage itself and ends where a straight run does, history included."""
    common = ("--deterministic", "--save_predictions", "0", "--checkpointing_steps", "100")
    straight = run(tiny_argv(tmp_path / "straight", synthetic_cache, *common))
    first = run(tiny_argv(tmp_path / "resumed", synthetic_cache, *common, "--stop_at_step", "2"))
    assert first.step == 2 and not adaptation(first).started
    assert find_latest_checkpoint(tmp_path / "resumed").name == "checkpoint-2"
    resumed = run(
        tiny_argv(tmp_path / "resumed", synthetic_cache, *common, "--resume_from_checkpoint", "latest")
    )
    assert resumed.step == 4 and adaptation(resumed).started
    _assert_states_equal(_cpsl_state(resumed), _cpsl_state(straight), "resumed vs straight")
    assert resumed.history == straight.history
    assert list(resumed.history["warmup"]) == ["2"]  # the boundary's evaluation is not repeated


@pytest.mark.slow
def test_two_processes_resume_across_the_boundary_equals_a_straight_run(tmp_path, synthetic_cache):
    common = (
        "--deterministic",
        "--save_predictions",
        "0",
        "--checkpointing_steps",
        "100",
        "--cpsl_steps",
        "3",
    )
    run(
        tiny_argv(tmp_path / "warm", synthetic_cache, "--warmup_steps", "1", "--cpsl_steps", "0")
    )  # data once
    results = {}
    for name, extra in (
        ("straight", ()),
        ("first", ("--stop_at_step", "2")),
        ("resumed", ("--resume_from_checkpoint", "latest")),
    ):
        folder = tmp_path / name
        folder.mkdir()
        output = tmp_path / ("straight_run" if name == "straight" else "resumed_run")
        run_two_processes(FINAL_STATE_DRIVER, folder, tiny_argv(output, synthetic_cache, *common, *extra))
        results[name] = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [r["step"] for r in results["first"]] == [2, 2] and results["first"][0]["selflabel"] is None
    for rank in (0, 1):
        straight, resumed = results["straight"][rank], results["resumed"][rank]
        assert resumed["step"] == straight["step"] == 5
        for part in ("student", "teacher", "selflabel"):
            _assert_states_equal(resumed[part], straight[part], f"rank {rank} {part}")
        assert resumed["history"] == straight["history"]


# ------------------------------------------------------------------------------------------------ a new stage
def test_a_stage_added_from_outside_runs_evaluates_exports_and_resumes(
    tmp_path, synthetic_cache, monkeypatch, capsys, caplog
):
    import logging

    from transformers import AutoModel

    caplog.set_level(logging.INFO, logger="cpsl_hf.training.loop")
    monkeypatch.setattr(stage_registry, "STAGE_BUILDERS", [*stage_registry.STAGE_BUILDERS, add_entropy_stage])
    common = ("--deterministic", "--save_predictions", "0", "--checkpointing_steps", "100")
    out = tmp_path / "straight"
    straight = run(tiny_argv(out, synthetic_cache, *common))
    assert [stage.name for stage in straight.stages] == ["warmup", "cpsl", "entropy"]
    assert isinstance(straight.stages[-1], EntropyStage) and straight.step == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["history"]) == ["warmup", "cpsl", "entropy"]
    assert metrics["final"]["stage"] == "entropy" and metrics["exported_model"] == "student"
    assert set(metrics["history"]["entropy"]["6"]) == {"student"}
    assert "2 warm-up + 2 CPSL + 2 entropy minimisation" in (out / "README.md").read_text()
    printed = capsys.readouterr().out
    assert "| class | warm-up | cpsl student | cpsl teacher | entropy minimisation |" in printed
    exported = AutoModel.from_pretrained(out).state_dict()
    _assert_states_equal(exported, student_state(straight), "exported vs the entropy stage's student")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(":")[0] for line in logged[-2:]] == ["step 5/6 (entropy)", "step 6/6 (entropy)"]
    assert all("loss_entropy" in line and "loss_source" not in line for line in logged[-2:])

    resumed_dir = tmp_path / "resumed"
    run(tiny_argv(resumed_dir, synthetic_cache, *common, "--stop_at_step", "5"))
    resumed = run(tiny_argv(resumed_dir, synthetic_cache, *common, "--resume_from_checkpoint", "latest"))
    _assert_states_equal(student_state(resumed), student_state(straight), "resumed inside the new stage")
    assert resumed.history == straight.history


def test_stage_names_must_be_unique(monkeypatch):
    monkeypatch.setattr(
        stage_registry,
        "STAGE_BUILDERS",
        [*stage_registry.STAGE_BUILDERS, add_entropy_stage, add_entropy_stage],
    )
    with pytest.raises(ValueError, match="two stages of the run share the name 'entropy'"):
        stage_registry.build_stages(parse_args([]))


def test_a_checkpoint_of_other_stages_is_refused(tmp_path, synthetic_cache, monkeypatch):
    common = ("--save_predictions", "0", "--checkpointing_steps", "100")
    run(tiny_argv(tmp_path / "run", synthetic_cache, *common, "--stop_at_step", "1"))
    monkeypatch.setattr(stage_registry, "STAGE_BUILDERS", [*stage_registry.STAGE_BUILDERS, add_entropy_stage])
    with pytest.raises(ValueError, match=r"the checkpoint's stages \(warmup, cpsl\) are not this run's"):
        run(tiny_argv(tmp_path / "run", synthetic_cache, *common, "--resume_from_checkpoint", "latest"))
