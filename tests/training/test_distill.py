"""The distillation rounds after CPSL (SPEC.md stage 3) on tiny synthetic data: export, hard labels, the fresh
student of each round, resume inside and across rounds, the schedule, bad configuration."""

import json
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from training_helpers import adaptation, current_round, distill_round, run, run_two_processes
from training_helpers import tiny_argv as shared_tiny_argv

from cpsl_hf.training.arguments import ConfigurationError, parse_args
from cpsl_hf.training.building import build_model
from cpsl_hf.training.checkpointing import find_latest_checkpoint
from cpsl_hf.training.loop import Trainer
from cpsl_hf.training.pseudo_labels import flip_averaged_probabilities, hard_pseudo_labels
from cpsl_hf.training.stages import build_stages


def tiny_argv(output_dir, cache, *extra):
    """The shared tiny run (2 warm-up + 2 CPSL steps) without prediction strips."""
    return shared_tiny_argv(output_dir, cache, "--save_predictions", "0", *extra)


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def _assert_equal_states(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=f"{what}: {name}")


def _differs(first: dict, second: dict) -> bool:
    return any(not torch.equal(first[name], second[name]) for name in first)


# ------------------------------------------------------------------------------------------------ a whole run
def test_two_rounds_export_the_last_student(tmp_path, synthetic_cache, capsys):
    from transformers import AutoModel

    out = tmp_path / "run"
    trainer = run(
        tiny_argv(
            out, synthetic_cache, "--eval_steps", "1", "--distill_rounds", "2", "--distill_steps", "2",
            "--distill_threshold", "0.0", "--save_predictions", "1",
        )
    )  # fmt: skip
    assert trainer.step == 8 and distill_round(trainer) == 2

    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert list(history) == ["warmup", "cpsl", "distill1", "distill2"]
    assert sorted(history["distill1"], key=int) == ["5", "6"]
    assert sorted(history["distill2"], key=int) == ["7", "8"]
    for stage in ("distill1", "distill2"):
        for evaluation in history[stage].values():
            assert set(evaluation) == {"student"}  # the frozen model is not a network of the round
            assert len(evaluation["student"]["per_category_iou"]) == 19
    assert set(history["cpsl"]["4"]) == {"student", "teacher"}
    assert metrics["exported_model"] == "student"
    assert metrics["final"]["stage"] == "distill2" and metrics["final"]["step"] == 8
    assert metrics["final"]["mean_iou"] == history["distill2"]["8"]["student"]["mean_iou"]
    assert metrics["training"]["distill_rounds"] == 2 and metrics["training"]["distill_init"] == "pretrained"
    assert (out / "predictions" / "distill2-step000008").is_dir()

    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| class |"))
    assert header == "| class | warm-up | cpsl student | cpsl teacher | distill1 | distill2 |"
    assert "distill2 student" in printed  # the "Model (...)" line names what was exported
    card = (out / "README.md").read_text()
    assert "2 x 2 distillation" in card and "distill2 (student)" in card
    # The hyperparameters table lists the distillation and adversarial groups with the cpsl and training ones.
    assert "| lambda_distill_kl | `1.0` |" in card and "| distill_rounds | `2` |" in card
    assert "| warmup_adversarial | `False` |" in card and "| lambda_sl | `0.1` |" in card

    model = AutoModel.from_pretrained(out)
    _assert_equal_states(model.state_dict(), trainer.student.state_dict(), "exported vs last student")
    # The last round's student is not its frozen labeller (round 1's final student).
    previous_model = current_round(trainer).previous_model
    assert _differs(trainer.student.state_dict(), previous_model.state_dict())
    assert not any(p.requires_grad for p in previous_model.parameters())
    assert not previous_model.training


# ------------------------------------------------------------------------------------------------ hard labels
class PixelwiseModel(nn.Module):
    """Logits ``weight[c] * x[:, c % 3] + bias[c, column]``: elementwise, so every pixel's output is exact
    whatever the batch it is computed in; the column-dependent bias makes a mirror image give other logits."""

    def __init__(self, num_classes: int = 5, width: int = 6):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.randn(num_classes, generator=generator) * 4)
        self.bias = nn.Parameter(torch.randn(num_classes, 1, width, generator=generator) * 2)
        self.channels = [c % 3 for c in range(num_classes)]

    def forward(self, pixel_values):
        logits = pixel_values[:, self.channels] * self.weight[None, :, None, None] + self.bias[None]
        return SimpleNamespace(logits=logits)


def _independent_flip_average(model, images):
    with torch.no_grad():
        plain = model(images).logits.softmax(dim=1)
        mirrored = model(images.flip(-1)).logits.softmax(dim=1).flip(-1)
    return (plain + mirrored) / 2


def test_hard_labels_average_the_mirror_image_and_drop_unconfident_pixels():
    model = PixelwiseModel()
    images = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probabilities = flip_averaged_probabilities(model, images)
    expected = _independent_flip_average(model, images)
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=0)
    assert not torch.allclose(probabilities, model(images).logits.softmax(dim=1))  # the mirror image counts

    confidence, argmax = expected.max(dim=1)
    threshold = float(confidence[0, 1, 2])  # a pixel exactly at the threshold is dropped (<=)
    valid = torch.ones(2, 4, 6, dtype=torch.bool)
    valid[1, :, 0] = False
    labels = hard_pseudo_labels(probabilities, threshold, valid)
    expected_labels = torch.where((confidence > threshold) & valid, argmax, torch.full_like(argmax, 255))
    assert torch.equal(labels, expected_labels)
    assert labels.dtype == torch.int64 and int(labels[0, 1, 2]) == 255
    assert bool((labels != 255).any()) and bool((labels == 255).sum() > 6)
    assert bool((labels[1, :, 0] == 255).all())
    assert torch.equal(hard_pseudo_labels(probabilities, 0.0), argmax)  # threshold 0 keeps every pixel


def test_flip_average_of_a_real_network():
    """The CPSL network (SegFormer preset): one batched forward of both orientations equals two forwards."""
    args = parse_args([])
    torch.manual_seed(0)
    model = build_model(args).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probabilities = flip_averaged_probabilities(model, images)
    torch.testing.assert_close(probabilities, _independent_flip_average(model, images))
    assert probabilities.shape == (2, 19, 8, 8)


# ------------------------------------------------------------------------------------------------ round starts
class RecordingTrainer(Trainer):
    """Records the networks just before and just after each round's start."""

    def start_stage(self, stage) -> None:
        if not stage.name.startswith("distill"):
            return super().start_stage(stage)
        before = {
            "student": _copy(self.student.state_dict()),
            "teacher": _copy(adaptation(self).teacher.module.state_dict()),
        }
        super().start_stage(stage)
        after = {
            "student": _copy(self.student.state_dict()),
            "previous": _copy(stage.previous_model.state_dict()),
            "optimizer_state": len(self.optimizer.optimizer.state),
        }
        self.recorded = getattr(self, "recorded", {})
        self.recorded[stage.round_index] = (before, after)


def test_pretrained_init_restarts_from_the_initial_weights(tmp_path, synthetic_cache):
    from accelerate.utils import set_seed

    argv = tiny_argv(
        tmp_path / "pretrained", synthetic_cache, "--distill_rounds", "2", "--distill_steps", "1"
    )
    trainer = run(argv, RecordingTrainer)
    set_seed(0)  # --seed 0: what build_model gives the run before its warm-up
    initial = build_model(parse_args(argv)).state_dict()

    before, after = trainer.recorded[1]
    _assert_equal_states(after["previous"], before["student"], "round 1 labeller = CPSL student")
    _assert_equal_states(after["student"], initial, "round 1 student = initial weights")
    assert _differs(before["student"], initial)  # warm-up and CPSL did change the weights
    assert after["optimizer_state"] == 0
    before, after = trainer.recorded[2]
    _assert_equal_states(after["previous"], before["student"], "round 2 labeller = round 1 student")
    _assert_equal_states(after["student"], initial, "round 2 student = initial weights")


def test_previous_init_copies_the_exported_teacher(tmp_path, synthetic_cache):
    argv = tiny_argv(
        tmp_path / "previous", synthetic_cache, "--distill_rounds", "1", "--distill_steps", "1",
        "--distill_init", "previous", "--export_model", "teacher", "--no_distill_source_loss",
    )  # fmt: skip
    trainer = run(argv, RecordingTrainer)
    before, after = trainer.recorded[1]
    _assert_equal_states(after["previous"], before["teacher"], "labeller = CPSL export (EMA teacher)")
    _assert_equal_states(after["student"], before["teacher"], "student = copy of the labeller")
    assert _differs(before["student"], before["teacher"])
    metrics = json.loads((tmp_path / "previous" / "metrics.json").read_text())
    assert metrics["exported_model"] == "student"  # after distillation: the last round's student


# ------------------------------------------------------------------------------------------------ resume
def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
    state.update({f"previous.{k}": v for k, v in current_round(trainer).previous_model.state_dict().items()})
    cpsl = adaptation(trainer)
    state.update(
        {f"teacher.{k}": v for k, v in cpsl.teacher.state_dict().items() if isinstance(v, torch.Tensor)}
    )
    state.update({f"selflabel.{k}": v for k, v in cpsl.self_labeling.state_dict().items()})
    return state


def test_resume_inside_and_at_the_end_of_a_round_equals_a_straight_run(tmp_path, synthetic_cache):
    common = (
        "--deterministic", "--distill_rounds", "2", "--distill_steps", "3", "--distill_threshold", "0.0",
        "--checkpointing_steps", "100",
    )  # fmt: skip
    straight = run(tiny_argv(tmp_path / "straight", synthetic_cache, *common))
    assert straight.step == 10

    resumed_dir = tmp_path / "resumed"
    first = run(tiny_argv(resumed_dir, synthetic_cache, *common, "--stop_at_step", "6"))
    assert (first.step, distill_round(first)) == (6, 1)  # 2 of round 1's 3 steps done
    assert find_latest_checkpoint(resumed_dir).name == "checkpoint-6"
    resume = ("--resume_from_checkpoint", "latest")
    second = run(tiny_argv(resumed_dir, synthetic_cache, *common, *resume, "--stop_at_step", "7"))
    assert (second.step, distill_round(second)) == (7, 1)  # stopped exactly at the end of round 1
    last = run(tiny_argv(resumed_dir, synthetic_cache, *common, *resume))
    assert (last.step, distill_round(last)) == (10, 2)

    expected = _state(straight)
    _assert_equal_states(_state(last), expected, "resumed vs straight")
    assert last.history.keys() == straight.history.keys()
    for stage in ("distill1", "distill2"):
        assert last.history[stage] == straight.history[stage]


DRIVER = textwrap.dedent(
    """
    import sys
    import torch
    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    trainer = Trainer(parse_args(sys.argv[2:]))
    trainer.train()
    previous_model = trainer.stages[-1].previous_model
    state = {
        "student": trainer.student.state_dict(),
        "previous": previous_model.state_dict(),
        "world": trainer.accelerator.num_processes,
        "previous_is_plain": type(previous_model).__name__,
    }
    torch.save(state, f"{sys.argv[1]}/rank{trainer.accelerator.process_index}.pt")
    """
)


@pytest.mark.slow
def test_two_processes_distill_identically(tmp_path, synthetic_cache):
    run(
        tiny_argv(tmp_path / "warm", synthetic_cache, "--warmup_steps", "1", "--cpsl_steps", "0")
    )  # data cache
    argv = tiny_argv(
        tmp_path / "ddp", synthetic_cache, "--source_batch_size", "1", "--target_batch_size", "1",
        "--distill_rounds", "2", "--distill_steps", "2", "--distill_threshold", "0.0", "--checkpointing_steps", "5",
    )  # fmt: skip
    run_two_processes(DRIVER, tmp_path, argv)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["previous_is_plain"] == "CPSLForSemanticSegmentation"  # not wrapped in DDP
    for part in ("student", "previous"):
        _assert_equal_states(rank1[part], rank0[part], f"rank 1 vs rank 0 {part}")
    assert (tmp_path / "ddp" / "checkpoints" / "checkpoint-5" / "COMPLETE").is_file()  # saved inside round 1
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["final"]["stage"] == "distill2"


# ------------------------------------------------------------------------------------------------ schedule
def test_every_round_is_a_stage_that_restarts_the_schedule():
    args = parse_args(
        ["--warmup_steps", "10", "--cpsl_steps", "20", "--distill_rounds", "2", "--distill_steps", "5"]
    )
    trainer = Trainer(args)
    assert [(stage.name, stage.steps) for stage in trainer.stages] == [
        ("warmup", 10), ("cpsl", 20), ("distill1", 5), ("distill2", 5)
    ]  # fmt: skip
    stages = [trainer.stage_at(step).name for step in (0, 9, 10, 29, 30, 34, 35, 39, 40)]
    assert stages == [
        "warmup",
        "warmup",
        "cpsl",
        "cpsl",
        "distill1",
        "distill1",
        "distill2",
        "distill2",
        "distill2",
    ]

    flags = [
        "--warmup_steps", "10", "--cpsl_steps", "20", "--lr_warmup_steps", "2", "--poly_power", "1",
        "--cpsl_lr_scale", "0.5", "--distill_steps", "5", "--distill_rounds", "2", "--distill_lr_scale", "3",
    ]  # fmt: skip
    stage_lr_factor = Trainer(parse_args(flags)).lr_factor
    assert stage_lr_factor(29) == pytest.approx(0.5 * (1 - 19 / 20))
    assert stage_lr_factor(30) == pytest.approx(3.0 * 0.5)  # round 1: warm-up ramp restarts
    assert stage_lr_factor(33) == pytest.approx(3.0 * (1 - 3 / 5))
    assert stage_lr_factor(35) == pytest.approx(3.0 * 0.5)  # round 2 restarts again
    assert stage_lr_factor(36) == pytest.approx(3.0 * (1 - 1 / 5))
    assert stage_lr_factor(40) == 0.0
    # Without rounds the schedule is the two-stage one.
    two_stages = Trainer(parse_args([*flags, "--distill_rounds", "0"])).lr_factor
    assert two_stages(30) == 0.0
    assert two_stages(12) == pytest.approx(0.5 * (1 - 2 / 20))


# ------------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--distill_rounds", "1", "--distill_steps", "0"], "--distill_steps"),
        (["--distill_rounds", "-1"], "--distill_rounds"),
        (["--distill_threshold", "1.0"], "--distill_threshold"),
        (["--distill_threshold", "-0.1"], "--distill_threshold"),
        (["--lambda_distill_kl", "-1"], "--lambda_distill_kl"),
        (["--distill_lr_scale", "0"], "--distill_lr_scale"),
        (["--warmup_steps", "0", "--cpsl_steps", "0"], "--distill_rounds"),
    ],
)
def test_bad_distillation_settings_name_the_argument(argv, named):
    with pytest.raises(ConfigurationError, match=named):
        parse_args(argv)


def test_distillation_settings_from_a_recipe(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("distill:\n  distill_rounds: 2\n  distill_init: imagenet\n")
    with pytest.raises(ConfigurationError, match="--distill_init"):
        parse_args(["--config", str(config)])
    config.write_text("distill:\n  distill_rounds: 2\n  distill_source_loss: false\n")
    args = parse_args(["--config", str(config)])
    assert (args.distill.distill_rounds, args.distill.distill_source_loss) == (2, False)
    config.write_text("training:\n  distill_rounds: 2\n")  # the round's settings live in distill:
    with pytest.raises(
        ConfigurationError, match="distill_rounds is in section training: but belongs in section distill:"
    ):
        parse_args(["--config", str(config)])
    # Distillation alone (e.g. from a finished CPSL checkpoint) is a run with something to train.
    args = parse_args(["--warmup_steps", "0", "--cpsl_steps", "0", "--distill_rounds", "1"])
    assert [stage.name for stage in build_stages(args)] == ["warmup", "cpsl", "distill1"]
    defaults = parse_args([]).distill
    assert (defaults.distill_rounds, defaults.distill_threshold, defaults.distill_init) == (
        0,
        0.95,
        "pretrained",
    )
    assert (defaults.lambda_distill_kl, defaults.distill_source_loss) == (1.0, True)
