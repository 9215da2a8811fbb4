"""Atomic checkpoints: a save killed half-way leaves the previous checkpoint usable and is never picked."""

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from cpsl_hf.training.checkpointing import (
    COMPLETE_MARKER,
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
    with pytest.raises(ValueError, match="not a complete checkpoint"):
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
