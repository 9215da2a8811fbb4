"""The whole trainer on a plain-ViT backbone: ``--backbone <folder of a DINOv2 encoder>`` warms up, runs CPSL,
evaluates and exports with nothing else changed, and a run stopped and resumed ends where a straight run ends."""

import math
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import FINAL_STATE_DRIVER, adaptation, run, run_two_processes, tiny_argv
from transformers import AutoConfig, Dinov2Model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared tiny backbone configs
from backbone_helpers import TINY_BACKBONES  # noqa: E402

from cpsl_hf import CPSLForSemanticSegmentation  # noqa: E402


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    """A tiny random DINOv2 encoder (4 layers of width 32, patch 14) saved as ``Dinov2Model`` does."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dinov2")
    encoder = Dinov2Model(AutoConfig.for_model(**TINY_BACKBONES["dinov2"]))
    encoder.save_pretrained(folder)
    return folder


def _weights(trainer) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
    teacher = adaptation(trainer).teacher.state_dict()
    state.update({f"teacher.{k}": v for k, v in teacher.items() if isinstance(v, torch.Tensor)})
    return state


def test_cpsl_trains_on_a_vit_backbone_and_resume_equals_a_straight_run(
    tmp_path, synthetic_cache, dinov2_folder
):
    flags = ("--backbone", str(dinov2_folder), "--deterministic")
    straight = run(tiny_argv(tmp_path / "straight", synthetic_cache, *flags))
    assert straight.step == 4
    student = straight.student
    assert type(student.backbone).__name__ == "Dinov2Backbone" and student.neck is not None
    pretrained = Dinov2Model.from_pretrained(dinov2_folder).state_dict()
    trained = student.backbone.state_dict()
    assert any(not torch.equal(trained[key], pretrained[key]) for key in pretrained)  # the encoder trained
    losses = [entry for entry in straight.log_history if "loss_source" in entry]
    assert losses and all(math.isfinite(entry["loss_source"]) for entry in losses)
    assert any(entry["stage"] == "cpsl" for entry in straight.log_history)  # the CPSL stage ran

    common = (*flags, "--checkpointing_steps", "100", "--resume_from_checkpoint", "auto")
    first = run(tiny_argv(tmp_path / "requeued", synthetic_cache, *common, "--stop_at_step", "3"))
    assert first.step == 3
    resumed = run(tiny_argv(tmp_path / "requeued", synthetic_cache, *common))
    assert resumed.step == 4
    expected, state = _weights(straight), _weights(resumed)
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)

    # The run folder holds the exported CPSL checkpoint of that family and a card that names it.
    folder = tmp_path / "straight"
    reloaded = CPSLForSemanticSegmentation.from_pretrained(folder)
    assert reloaded.config.backbone_type == "dinov2" and reloaded.config.pyramid_channels == 256
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[f"student.{key}"]), key  # the exported network is the student
    card = (folder / "README.md").read_text()
    assert "DINOv2 ViT (simple feature pyramid) custom size, segformer decode head, D=256" in card


def test_two_processes_train_a_vit_backbone_under_ddp(tmp_path, synthetic_cache, dinov2_folder):
    """DDP fails on a trainable parameter that gets no gradient: the unused mask token is frozen, and the two
    ranks end with the same student."""
    argv = tiny_argv(tmp_path / "run", synthetic_cache, "--backbone", str(dinov2_folder), "--cpsl_steps", "1")
    run_two_processes(FINAL_STATE_DRIVER, tmp_path, argv)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))
    assert first["step"] == second["step"] == 3
    for key, tensor in first["student"].items():
        assert torch.equal(tensor, second["student"][key]), key
