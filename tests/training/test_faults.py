"""Faults, with real runs and real processes: a stop signal (two processes, the signal reaching one) and
``--max_train_time`` stop after a step with a checkpoint and the preempted exit status, and the resume equals an
uninterrupted run; a second signal exits at once and leaves the last complete checkpoint ``latest``; a NaN step
changes nothing (student, optimiser, teacher, bank, prior) compared with a run that skipped the step's update;
consecutive NaN steps stop the run without a checkpoint or an export; a diverging run exports no NaN."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from example_stages import student_state
from training_helpers import REPOSITORY, adaptation, run, tiny_argv

from cpsl_hf.training.arguments import parse_args
from cpsl_hf.training.checkpointing import find_latest_checkpoint
from cpsl_hf.training.export import check_finite
from cpsl_hf.training.faults import (
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    NonFiniteModelError,
    NonFiniteTraining,
    Preempted,
)
from cpsl_hf.training.loop import Trainer

COMMON = ("--deterministic", "--save_predictions", "0", "--eval_teacher", "false")


def _assert_equal(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=f"{what}: {name}")


def _clone(state: dict) -> dict:
    return {name: value.detach().clone() for name, value in state.items()}


def _run_state(trainer: Trainer) -> dict:
    stage = adaptation(trainer)
    return {
        "student": student_state(trainer),
        "teacher": _clone(stage.teacher.module.state_dict()),
        "selflabel": _clone(stage.self_labeling.state_dict()),
    }


def _assert_runs_equal(actual: dict, expected: dict) -> None:
    for part in expected:
        _assert_equal(actual[part], expected[part], part)


def _subprocess(command, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, cwd=REPOSITORY, **kwargs
    )


# ------------------------------------------------------------------------------------------------ preemption
SIGNAL_DRIVER = textwrap.dedent(
    """
    import os
    import signal
    import sys

    import torch
    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    SIGNAL_AT = int(os.environ.get("SIGNAL_AT_STEP", "-1"))


    class SignalledTrainer(Trainer):
        # rank 0 alone gets a real SIGTERM right after optimisation step SIGNAL_AT
        def optimisation_step_done(self, stage):
            super().optimisation_step_done(stage)
            if self.step == SIGNAL_AT and self.accelerator.process_index == 0:
                os.kill(os.getpid(), signal.SIGTERM)


    before = signal.getsignal(signal.SIGTERM)
    trainer = SignalledTrainer(parse_args(sys.argv[2:]))
    code = 0
    try:
        trainer.train()
    except SystemExit as stopped:
        code = stopped.code
    cpsl = trainer.stages[1]
    state = {
        "code": code,
        "step": trainer.step,
        "handler_restored": signal.getsignal(signal.SIGTERM) is before,
        "student": trainer.student.state_dict(),
        "teacher": cpsl.teacher.module.state_dict(),
        "selflabel": None if cpsl.self_labeling is None else cpsl.self_labeling.state_dict(),
    }
    torch.save(state, f"{sys.argv[1]}/rank{trainer.accelerator.process_index}.pt")
    sys.exit(code)
    """
)


def _two_processes(folder: Path, argv, signal_at: int = -1) -> subprocess.CompletedProcess:
    folder.mkdir()
    driver = folder / "driver.py"
    driver.write_text(SIGNAL_DRIVER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(driver), str(folder), *argv,
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPOSITORY),
        "SIGNAL_AT_STEP": str(signal_at),
    }
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPOSITORY)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_the_resume_equals_a_straight_run(
    tmp_path, synthetic_cache
):
    common = (*COMMON, "--warmup_steps", "1", "--cpsl_steps", "3")
    run(
        tiny_argv(tmp_path / "warm", synthetic_cache, "--warmup_steps", "1", "--cpsl_steps", "0")
    )  # data once
    straight = _two_processes(tmp_path / "straight", tiny_argv(tmp_path / "out_s", synthetic_cache, *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    output = tmp_path / "out_r"
    stopped = _two_processes(tmp_path / "first", tiny_argv(output, synthetic_cache, *common), signal_at=2)
    assert stopped.returncode != 0  # the workers exited with 75; the launcher reports the failure
    first = [torch.load(tmp_path / "first" / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [r["code"] for r in first] == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    assert [r["step"] for r in first] == [2, 2]  # both stopped after the step rank 0 was signalled at
    assert all(r["handler_restored"] for r in first)
    assert find_latest_checkpoint(output).name == "checkpoint-2"
    assert "--resume_from_checkpoint auto --output_dir" in stopped.stdout
    assert not (output / "model.safetensors").exists()
    resumed = _two_processes(
        tmp_path / "resumed",
        tiny_argv(output, synthetic_cache, *common, "--resume_from_checkpoint", "latest"),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        expected = torch.load(tmp_path / "straight" / f"rank{rank}.pt", weights_only=False)
        actual = torch.load(tmp_path / "resumed" / f"rank{rank}.pt", weights_only=False)
        assert actual["step"] == expected["step"] == 4
        for part in ("student", "teacher", "selflabel"):
            _assert_equal(actual[part], expected[part], f"rank {rank} {part}")


def test_max_train_time_stops_with_a_checkpoint_and_the_preempted_status_and_resumes_exactly(
    tmp_path, synthetic_cache
):
    straight = run(tiny_argv(tmp_path / "straight", synthetic_cache, *COMMON))
    output = tmp_path / "budget"
    script = [sys.executable, "scripts/train.py", *tiny_argv(output, synthetic_cache, *COMMON)]
    stopped = _subprocess([*script, "--max_train_time", "00:00:00.001"])  # spent at the first window
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    assert "Stopped at step 1 of 4" in stopped.stdout and "--resume_from_checkpoint auto" in stopped.stdout
    assert find_latest_checkpoint(output).name == "checkpoint-1"
    assert not (output / "model.safetensors").exists()
    resumed = run(tiny_argv(output, synthetic_cache, *COMMON, "--resume_from_checkpoint", "latest"))
    assert resumed.step == 4
    _assert_runs_equal(_run_state(resumed), _run_state(straight))
    assert resumed.history == straight.history


def test_in_process_stop_raises_preempted_and_restores_the_signal_handlers(tmp_path, synthetic_cache):
    before = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(parse_args(tiny_argv(tmp_path, synthetic_cache, *COMMON, "--max_train_time", "0.001")))
    with pytest.raises(Preempted) as stopped:
        trainer.train()
    assert stopped.value.code == EXIT_PREEMPTED and "Stopped at step 1 of 4" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is before


SECOND_SIGNAL_DRIVER = textwrap.dedent(
    """
    import os
    import signal
    import sys

    import torch
    from cpsl_hf.training import checkpointing
    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    real_save = torch.save


    def save_then_signal(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        # two signals in the middle of checkpoint-3's save: the first asks for a stop, the second exits now
        if "checkpoint-3" in str(path) and str(path).endswith("process_state_0.pt"):
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)


    checkpointing.torch.save = save_then_signal
    Trainer(parse_args(sys.argv[1:])).train()
    """
)


def test_a_second_signal_exits_at_once_and_an_interrupted_save_is_never_latest(tmp_path, synthetic_cache):
    driver = tmp_path / "driver.py"
    driver.write_text(SECOND_SIGNAL_DRIVER)
    output = tmp_path / "run"
    argv = tiny_argv(output, synthetic_cache, *COMMON, "--checkpointing_steps", "1")
    result = _subprocess([sys.executable, str(driver), *argv])
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-3000:]
    assert "exiting now" in result.stderr
    assert (output / "checkpoints" / ".checkpoint-3.tmp").is_dir()  # the interrupted save
    assert find_latest_checkpoint(output).name == "checkpoint-2"
    resumed = run(tiny_argv(output, synthetic_cache, *COMMON, "--resume_from_checkpoint", "latest"))
    assert resumed.step == 4 and (output / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ non-finite steps
class NaNAt(Trainer):
    """The loss of the optimisation steps in ``nan_steps`` is multiplied by NaN after the stage computed it (the
    step's forward, views, sampling and bank enqueue all happened): every gradient is NaN."""

    nan_steps: frozenset = frozenset()

    def micro_step(self, stage):
        if self.step in self.nan_steps:
            losses = stage.losses

            def poisoned(source_batch, target_batch):
                output = losses(source_batch, target_batch)
                output.losses["loss"] = output.losses["loss"] * float("nan")
                return output

            stage.losses = poisoned
            try:
                return super().micro_step(stage)
            finally:
                del stage.losses
        return super().micro_step(stage)


class NoUpdateAt(Trainer):
    """The reference: at ``skip_step`` the step reads its batches and runs its forward (the same data stream and
    random draws), then every state is put back as it was before the step: no backward, no optimiser step, no
    teacher update; the schedules step (the step still counts)."""

    skip_step = -1

    def micro_step(self, stage):
        if self.step != self.skip_step:
            return super().micro_step(stage)
        core = stage.self_labeling
        saved_core = _clone(core.state_dict())
        saved_student = _clone(self.student.state_dict())
        with self.accelerator.accumulate(self.model):
            source_batch = self.next_batch(self.source_loader)
            target_batch = self.next_batch(self.target_loader)
            target_batch.pop("labels")
            output = stage.losses(source_batch, target_batch)
        core.load_state_dict(saved_core)
        core._pending_updates.clear()
        self.student.load_state_dict(saved_student)  # the forward's BatchNorm statistics
        images = source_batch["pixel_values"].shape[0] + target_batch["pixel_values"].shape[0]
        return output, images

    def optimisation_step_done(self, stage):
        if self.step != self.skip_step:
            return super().optimisation_step_done(stage)
        self.scheduler.step()
        if self.prototype_scheduler is not None:
            self.prototype_scheduler.step()
        self.step += 1


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_nan_step_changes_nothing_compared_with_a_run_that_skipped_its_update(
    tmp_path, synthetic_cache, optimizer
):
    flags = (*COMMON, "--cpsl_steps", "3", "--optimizer", optimizer)
    step = 3  # the second CPSL step (the bank holds rows, the prior has moved), one more step follows

    class Injected(NaNAt):
        nan_steps = frozenset({step})

    class Reference(NoUpdateAt):
        skip_step = step

    injected = run(tiny_argv(tmp_path / "nan", synthetic_cache, *flags), Injected)
    reference = run(tiny_argv(tmp_path / "skip", synthetic_cache, *flags), Reference)
    assert injected.step == reference.step == 5
    _assert_runs_equal(_run_state(injected), _run_state(reference))
    for ours, theirs in zip(injected.optimizers(), reference.optimizers(), strict=True):
        for a, b in zip(ours.optimizer.state.values(), theirs.optimizer.state.values(), strict=True):
            _assert_equal(a, b, f"{optimizer} state")
    assert all(bool(torch.isfinite(p).all()) for p in injected.student.parameters())
    assert (tmp_path / "nan" / "model.safetensors").is_file()


def test_consecutive_nan_steps_stop_without_a_checkpoint_or_an_export(tmp_path, synthetic_cache, capsys):
    class Diverging(NaNAt):
        nan_steps = frozenset(range(2, 100))  # every step from the first CPSL step on

    flags = (*COMMON, "--cpsl_steps", "4", "--checkpointing_steps", "1", "--max_nonfinite_steps", "2")
    trainer = Diverging(parse_args(tiny_argv(tmp_path, synthetic_cache, *flags)))
    with pytest.raises(NonFiniteTraining) as stopped:
        trainer.train()
    assert stopped.value.code == EXIT_NONFINITE != 0
    assert trainer.step == 4  # steps 2 and 3 were the two consecutive non-finite ones
    message = str(stopped.value)
    assert "2 consecutive steps with a non-finite loss or gradient (--max_nonfinite_steps 2)" in message
    assert "checkpoint-2" in message and message in capsys.readouterr().out
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-2"  # the last good step
    assert not (tmp_path / "model.safetensors").exists()
    assert all(bool(torch.isfinite(p).all()) for p in trainer.student.parameters())


def test_a_diverging_learning_rate_exports_no_non_finite_model(tmp_path, synthetic_cache):
    from safetensors.torch import load_file

    try:
        run(tiny_argv(tmp_path, synthetic_cache, "--save_predictions", "0", "--learning_rate", "1e4"))
    except (NonFiniteTraining, NonFiniteModelError):
        assert not (tmp_path / "model.safetensors").exists()
        return
    weights = load_file(tmp_path / "model.safetensors")
    assert all(bool(torch.isfinite(tensor).all()) for tensor in weights.values())


def test_check_finite_refuses_a_network_with_nan():
    network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    check_finite(network)
    with torch.no_grad():
        network[1].running_var[0] = float("inf")
    with pytest.raises(NonFiniteModelError, match=r"1 tensor\(s\) hold NaN or Inf \(1.running_var\)"):
        check_finite(network)


# ------------------------------------------------------------------------------------------------ the pieces
def test_bank_enqueue_commit_and_revert_leave_the_bank_as_it_was():
    from cpsl_hf.selflabel import MemoryBank

    bank = MemoryBank(5, 3)
    bank.enqueue(torch.randn(4, 3))
    before = _clone(bank.state_dict())
    bank.enqueue(torch.randn(3, 3), commit=torch.tensor(False))
    _assert_equal(_clone(bank.state_dict()), before, "commit=False")
    undo = bank.enqueue(torch.randn(3, 3), torch.tensor([True, False, True]))
    after = _clone(bank.state_dict())
    bank.revert_(undo, torch.tensor(True))
    _assert_equal(_clone(bank.state_dict()), after, "kept")
    bank.revert_(undo, torch.tensor(False))
    _assert_equal(_clone(bank.state_dict()), before, "reverted")


def test_the_self_labeling_core_updates_nothing_from_non_finite_embeddings_and_settles_a_bad_step():
    from cpsl_hf.selflabel import SelfLabeling

    core = SelfLabeling(num_classes=4, embedding_dim=8, num_samples=6, bank_size=20, prior_momentum=0.5)
    generator = torch.Generator().manual_seed(0)

    def step(embeddings):
        p_st = torch.rand(2, 4, 5, 5, generator=generator).softmax(dim=1)
        prototypes = torch.randn(4, 8, generator=generator)
        core(embeddings, p_st, prototypes, prototypes.clone(), generator=generator)

    step(torch.randn(2, 8, 5, 5, generator=generator))
    before = _clone(core.state_dict())
    poisoned = torch.randn(2, 8, 5, 5, generator=generator)
    poisoned[1, :, 2, 2] = float("nan")
    poisoned[0] = float("inf")
    step(poisoned)
    _assert_equal(_clone(core.state_dict()), before, "non-finite embeddings")
    core.record_updates = True
    step(torch.randn(2, 8, 5, 5, generator=generator))
    step(torch.randn(2, 8, 5, 5, generator=generator))  # two forwards (micro-steps) of one bad step
    assert core.state_dict()["bank.pointer"] != before["bank.pointer"]
    core.settle_updates(torch.tensor(False))
    _assert_equal(_clone(core.state_dict()), before, "settled as non-finite")
    step(torch.randn(2, 8, 5, 5, generator=generator))
    moved = _clone(core.state_dict())
    core.settle_updates(torch.tensor(True))
    _assert_equal(_clone(core.state_dict()), moved, "settled as finite")
    assert not core._pending_updates


def test_the_ema_teacher_stays_put_when_the_step_was_not_finite():
    from cpsl_hf.training.ema import EMATeacher

    student = torch.nn.Linear(3, 2)
    teacher = EMATeacher(student, momentum=0.5)
    with torch.no_grad():
        student.weight.add_(1.0)
    before = _clone(teacher.module.state_dict())
    teacher.update(student, torch.tensor(False))
    _assert_equal(_clone(teacher.module.state_dict()), before, "disabled update")
    teacher.update(student, torch.tensor(True))
    expected = torch.lerp(before["weight"], student.weight.detach(), 0.5)
    torch.testing.assert_close(teacher.module.weight, expected, rtol=0, atol=0)


@pytest.mark.parametrize("value, seconds", [("90", 90.0), ("1:30", 90.0), ("01:00:00", 3600.0), ("0.5", 0.5)])
def test_max_train_time_accepts_seconds_and_clock_times(value, seconds):
    from cpsl_hf.training.arguments import parse_duration

    assert parse_duration(value) == seconds
    assert parse_args(["--max_train_time", value]).training.max_train_time == value


@pytest.mark.parametrize("value", ["", "abc", "1:2:3:4", "-5", "0", "1::2"])
def test_max_train_time_refuses_what_is_not_a_positive_duration(value):
    from cpsl_hf.training.arguments import ConfigurationError

    with pytest.raises(ConfigurationError, match="--max_train_time"):
        parse_args(["--max_train_time", value])


def test_max_nonfinite_steps_must_be_positive():
    from cpsl_hf.training.arguments import ConfigurationError

    with pytest.raises(ConfigurationError, match="--max_nonfinite_steps must be >= 1"):
        parse_args(["--max_nonfinite_steps", "0"])
