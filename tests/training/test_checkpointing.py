"""Checkpoints: atomic (a save killed half-way is never picked), verified (a damaged one is skipped or refused),
safe to fail (the previous one survives) and pickle-free (every file loads with ``weights_only=True``)."""

import json
import logging
import shutil
import textwrap

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn
from training_helpers import adaptation, run, run_two_processes, tiny_argv

from cpsl_hf.training.checkpointing import (
    COMPLETE_MARKER,
    TRAINER_STATE,
    CheckpointSaveError,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def _prepared():
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _train_step(model, optimizer):
    loss = model(torch.randn(4, 3)).pow(2).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_killed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    accelerator, model, optimizer = _prepared()
    _train_step(model, optimizer)
    saved_weights = model.weight.detach().clone()
    first = save_checkpoint(accelerator, tmp_path, 1, {"step": 1, "bank": torch.arange(5)}, {"loader": 1})
    assert (first / COMPLETE_MARKER).is_file()
    _train_step(model, optimizer)

    original = accelerator.save_state

    def dies_half_way(output_dir, **kwargs):
        original(output_dir, **kwargs)  # the weights are on disk ...
        raise KeyboardInterrupt("killed")  # ... but the process dies before the checkpoint is complete

    monkeypatch.setattr(accelerator, "save_state", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 2, {"step": 2, "bank": torch.arange(7)}, {"loader": 2})
    monkeypatch.undo()

    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert ".checkpoint-2.tmp" in leftovers and "checkpoint-2" not in leftovers
    assert find_latest_checkpoint(tmp_path) == first
    assert resolve_checkpoint("latest", tmp_path) == first
    with pytest.raises(ValueError, match="no COMPLETE marker"):
        resolve_checkpoint(str(tmp_path / "checkpoints" / ".checkpoint-2.tmp"), tmp_path)

    trainer_state, process_state = load_checkpoint(accelerator, first)
    assert trainer_state["step"] == 1 and torch.equal(trainer_state["bank"], torch.arange(5))
    assert process_state == {"loader": 1}
    torch.testing.assert_close(model.weight, saved_weights, rtol=0, atol=0)

    # The next save at the same step succeeds and replaces the leftovers.
    second = save_checkpoint(accelerator, tmp_path, 2, {"step": 2}, {"loader": 2})
    assert find_latest_checkpoint(tmp_path) == second
    assert not (tmp_path / "checkpoints" / ".checkpoint-2.tmp").exists()


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    accelerator, model, optimizer = _prepared()
    for step in range(1, 6):
        _train_step(model, optimizer)
        save_checkpoint(accelerator, tmp_path, step, {"step": step}, {}, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    assert resolve_checkpoint(None, tmp_path) is None
    assert resolve_checkpoint("latest", tmp_path / "elsewhere") is None  # nothing yet: start fresh


# ------------------------------------------------------------------ real checkpoints of a tiny run
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, synthetic_cache):
    """A run stopped at step 2 of 4 that saved after every step: ``checkpoints/checkpoint-1`` and ``-2``."""
    output = tmp_path_factory.mktemp("two_checkpoints")
    run(
        tiny_argv(
            output, synthetic_cache, "--deterministic", "--checkpointing_steps", "1", "--stop_at_step", "2"
        )
    )
    assert [p.name for p in list_checkpoints(output)] == ["checkpoint-1", "checkpoint-2"]
    return output


@pytest.fixture
def run_copy(two_checkpoints, tmp_path):
    """A private copy of the run's output folder, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(two_checkpoints, copy)
    return copy


def _weights(trainer) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
    teacher = adaptation(trainer).teacher.state_dict()
    state.update({f"teacher.{k}": v for k, v in teacher.items() if isinstance(v, torch.Tensor)})
    return state


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("option", ["latest", "auto"])
def test_a_truncated_shard_falls_back_to_the_previous_checkpoint(run_copy, option, caplog):
    shard = run_copy / "checkpoints" / "checkpoint-2" / "model.safetensors"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    with caplog.at_level(logging.WARNING):
        found = resolve_checkpoint(option, run_copy)
    assert found == run_copy / "checkpoints" / "checkpoint-1"
    warning = _warnings(caplog)
    assert "checkpoint-2" in warning and "model.safetensors" in warning
    assert f"expected {size} bytes, found {size // 2}" in warning


def test_a_missing_rank_file_or_a_changed_byte_falls_back(run_copy, caplog):
    (run_copy / "checkpoints" / "checkpoint-2" / "process_state_0.pt").unlink()
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint("auto", run_copy).name == "checkpoint-1"
    assert "process_state_0.pt: missing" in _warnings(caplog)

    # Same size, one byte different: only the checksum tells.
    caplog.clear()
    optimizer = run_copy / "checkpoints" / "checkpoint-1" / "optimizer.bin"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="none of the checkpoints .* is valid"):
        resolve_checkpoint("latest", run_copy)
    assert "optimizer.bin: sha256 checksum mismatch" in _warnings(caplog)


def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file(run_copy):
    newest = run_copy / "checkpoints" / "checkpoint-2"
    (newest / TRAINER_STATE).write_bytes(b"short")
    with pytest.raises(ValueError, match=r"trainer_state\.pt: expected \d+ bytes, found 5"):
        resolve_checkpoint(str(newest), run_copy)
    shutil.rmtree(newest)
    assert resolve_checkpoint(str(run_copy / "checkpoints" / "checkpoint-1"), run_copy).name == "checkpoint-1"


def test_a_checkpoint_without_a_file_list_is_not_trusted(run_copy, caplog):
    """Checkpoints written before the manifest (``COMPLETE`` said only the step) cannot be verified."""
    newest = run_copy / "checkpoints" / "checkpoint-2"
    (newest / COMPLETE_MARKER).write_text("step 2\n")
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint("latest", run_copy).name == "checkpoint-1"
    assert "checkpoint-2" in _warnings(caplog) and "lists no files" in _warnings(caplog)
    with pytest.raises(ValueError, match="lists no files"):
        resolve_checkpoint(str(newest), run_copy)


def test_every_file_loads_without_pickle(tmp_path, synthetic_cache):
    """A downloaded checkpoint folder cannot run code: no file needs unpickling of arbitrary objects. The run
    holds every kind of state there is: the adversarial warm-up's discriminator, offline pseudo-labels, the
    pseudo-label monitor, teacher and self-labeling core (stopped inside the CPSL stage)."""
    flags = ("--warmup_adversarial", "--pseudo_labels", "offline", "--pseudo_label_diagnostics")
    argv = tiny_argv(
        tmp_path, synthetic_cache, *flags, "--save_predictions", "0", "--checkpointing_steps", "1"
    )
    run([*argv, "--stop_at_step", "3"])
    folder = find_latest_checkpoint(tmp_path)
    assert folder.name == "checkpoint-3"
    manifest = json.loads((folder / COMPLETE_MARKER).read_text())
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == sorted([*manifest["files"], COMPLETE_MARKER])
    assert not [name for name in files if name.endswith(".pkl")]  # accelerate's pickled RNG file is gone
    loaded = {}
    for name in manifest["files"]:
        if name.endswith(".safetensors"):
            loaded[name] = load_file(folder / name)
        else:
            loaded[name] = torch.load(folder / name, map_location="cpu", weights_only=True)
    assert {"trainer_state.pt", "process_state_0.pt", "rng_state_0.pt", "optimizer.bin"} <= loaded.keys()
    stages = loaded[TRAINER_STATE]["stages"]
    assert loaded[TRAINER_STATE]["step"] == 3 and stages["cpsl"]["offline_labels"]["names"]
    assert loaded["process_state_0.pt"]["pseudo_label_monitor"]["totals"]
    assert isinstance(loaded["rng_state_0.pt"]["torch"], torch.Tensor)
    assert run([*argv, "--resume_from_checkpoint", "latest"]).step == 4  # and it resumes (weights_only loads)


def test_auto_starts_fresh_then_resumes_to_the_uninterrupted_result(tmp_path, synthetic_cache, caplog):
    """With gradient accumulation, so that accelerate's micro-step counter (restored from rng_state_0.pt now
    that its pickled RNG file is gone) is part of the resume."""
    accumulate = ("--deterministic", "--gradient_accumulation_steps", "2")
    common = (*accumulate, "--checkpointing_steps", "100", "--resume_from_checkpoint", "auto")
    uninterrupted = _weights(run(tiny_argv(tmp_path / "straight", synthetic_cache, *accumulate)))

    with caplog.at_level(logging.INFO, logger="cpsl_hf"):
        first = run(tiny_argv(tmp_path / "requeued", synthetic_cache, *common, "--stop_at_step", "3"))
    assert first.step == 3 and "no checkpoint in" in caplog.text and "starting fresh" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cpsl_hf"):
        resumed = run(tiny_argv(tmp_path / "requeued", synthetic_cache, *common))  # the same job, requeued
    assert "resuming from" in caplog.text and "checkpoint-3" in caplog.text
    assert resumed.step == 4
    state = _weights(resumed)
    assert state.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, synthetic_cache, monkeypatch):
    """The disk fills while checkpoint-2 is written: checkpoint-1 stays (pruning to 1 never ran) and is latest."""
    original = torch.save

    def disk_full_at_step_2(obj, f, *args, **kwargs):
        if ".checkpoint-2.tmp" in str(f) and str(f).endswith(TRAINER_STATE):
            raise OSError(28, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    argv = tiny_argv(
        tmp_path, synthetic_cache, "--checkpointing_steps", "1", "--checkpoints_total_limit", "1"
    )
    with pytest.raises(CheckpointSaveError, match="No space left on device") as raised:
        run(argv)
    monkeypatch.undo()
    previous = tmp_path / "checkpoints" / "checkpoint-1"
    assert f"the previous checkpoint {previous} is intact" in str(raised.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint-1"
    ]  # partial one gone
    assert find_latest_checkpoint(tmp_path) == previous
    assert resolve_checkpoint("latest", tmp_path) == previous


DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    trainer = Trainer(parse_args(sys.argv[2:]))
    trainer.train()
    state = {"step": trainer.step, "student": trainer.student.state_dict()}
    torch.save(state, Path(sys.argv[1]) / f"rank{trainer.accelerator.process_index}.pt")
    """
)


@pytest.mark.slow
def test_two_processes_save_verify_and_fall_back_together(tmp_path, synthetic_cache):
    """2 gloo processes: every rank writes its files into one verified checkpoint; when rank 1's file of the
    newest is lost, both ranks agree (the main process decides) to resume from the previous one."""
    run(
        tiny_argv(tmp_path / "warm", synthetic_cache, "--warmup_steps", "1", "--cpsl_steps", "0")
    )  # data cache
    argv = tiny_argv(
        tmp_path / "ddp", synthetic_cache, "--source_batch_size", "1", "--target_batch_size", "1",
        "--checkpointing_steps", "1", "--resume_from_checkpoint", "auto",
    )  # fmt: skip
    run_two_processes(DRIVER, tmp_path, [*argv, "--stop_at_step", "2"])
    checkpoints = tmp_path / "ddp" / "checkpoints"
    manifest = json.loads((checkpoints / "checkpoint-2" / COMPLETE_MARKER).read_text())
    assert manifest["num_processes"] == 2
    assert {"process_state_1.pt", "rng_state_1.pt"} <= manifest["files"].keys()

    (checkpoints / "checkpoint-2" / "process_state_1.pt").unlink()
    result = run_two_processes(DRIVER, tmp_path, argv)
    assert "skipping checkpoint" in result.stderr and "process_state_1.pt: missing" in result.stderr
    assert "resuming from" in result.stderr and "checkpoint-1" in result.stderr
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["step"] == rank1["step"] == 4
    for name, tensor in rank0["student"].items():
        torch.testing.assert_close(rank1["student"][name], tensor, rtol=0, atol=0, msg=name)
