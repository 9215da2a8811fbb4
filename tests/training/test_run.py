"""End-to-end runs of the UDA trainer on tiny synthetic data: every stage, resume, 2 processes, bad config."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from training_helpers import adaptation, run, run_two_processes, tiny_argv

from cpsl_hf.training.checkpointing import find_latest_checkpoint
from cpsl_hf.training.loop import Trainer

REPOSITORY = Path(__file__).resolve().parents[2]


def test_every_stage_runs_and_exports_a_loadable_model(tmp_path, synthetic_cache, capsys):
    from transformers import AutoModel

    trainer = run(tiny_argv(tmp_path / "run", synthetic_cache, "--eval_steps", "1"))
    printed = capsys.readouterr().out
    assert "| **mIoU** |" in printed and "warm-up" in printed and "cpsl student" in printed
    assert str((tmp_path / "run").resolve()) in printed

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert sorted(metrics["history"]["warmup"], key=int) == ["1", "2"]
    assert sorted(metrics["history"]["cpsl"], key=int) == ["3", "4"]
    final = metrics["history"]["cpsl"]["4"]
    assert set(final) == {"student", "teacher"}
    assert len(final["student"]["per_category_iou"]) == 19
    assert metrics["final"]["mean_iou"] == final["student"]["mean_iou"]
    # Prediction strips after every evaluation and with the exported model, linked from the card.
    evaluated = ["warmup-step000001", "warmup-step000002", "cpsl-step000003", "cpsl-step000004"]
    for folder in evaluated:
        assert len(list((tmp_path / "run" / "predictions" / folder).glob("*.png"))) == 4
    exported_strips = sorted((tmp_path / "run" / "predictions").glob("*.png"))
    assert len(exported_strips) == 4
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"predictions/{exported_strips[0].name}" in card

    model = AutoModel.from_pretrained(tmp_path / "run")
    exported = trainer.student.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, exported[name], rtol=0, atol=0)
    # The CPSL stage ran the self-labeling core: the bank is full of teacher embeddings, W was initialised.
    assert bool(adaptation(trainer).self_labeling.bank.valid.all())
    prototypes = model.self_labeling_head.prototypes
    assert not torch.equal(prototypes, adaptation(trainer).teacher.module.self_labeling_head.prototypes.cpu())


def test_reference_options_run(tmp_path, synthetic_cache):
    """Offline P_ST, CutMix, one-direction SL-head KL, CE + RCE, L_SL into the student, uniform sampling,
    static prior, the logits branch, the EMA ramp, SGD, teacher export: one run through all of them."""
    trainer = run(
        tiny_argv(
            tmp_path / "reference", synthetic_cache,
            "--pseudo_labels", "offline", "--mix", "cutmix", "--mix_prob", "1.0", "--consistency", "reference",
            "--target_loss", "ce+rce", "--sl_grad_to_student_embeddings", "--sampling", "uniform",
            "--prior", "static", "--sl_logits_branch", "--ema_ramp", "--optimizer", "sgd",
            "--export_model", "teacher", "--gradient_accumulation_steps", "2",
        )
    )  # fmt: skip
    assert adaptation(trainer).offline_labels.probabilities.dtype == torch.float16
    assert adaptation(trainer).offline_labels.probabilities.shape[:2] == (8, 19)
    assert trainer.step == 4
    initial_prior = adaptation(trainer).self_labeling.prior.distribution.clone()
    metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert metrics["exported_model"] == "teacher"
    assert metrics["final"]["mean_iou"] == metrics["history"]["cpsl"]["4"]["teacher"]["mean_iou"]
    assert torch.equal(initial_prior, adaptation(trainer).self_labeling.prior.distribution)  # static


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
    state.update(
        {
            f"teacher.{k}": v
            for k, v in adaptation(trainer).teacher.state_dict().items()
            if isinstance(v, torch.Tensor)
        }
    )
    state.update({f"selflabel.{k}": v for k, v in adaptation(trainer).self_labeling.state_dict().items()})
    return state


def test_resume_equals_an_uninterrupted_run(tmp_path, synthetic_cache):
    common = ("--deterministic", "--cpsl_steps", "4", "--checkpointing_steps", "100")
    uninterrupted = _state(run(tiny_argv(tmp_path / "straight", synthetic_cache, *common)))

    first = run(tiny_argv(tmp_path / "resumed", synthetic_cache, *common, "--stop_at_step", "3"))
    assert first.step == 3
    checkpoint = find_latest_checkpoint(tmp_path / "resumed")
    assert checkpoint.name == "checkpoint-3"
    # A later save that died half-way: no marker, so "latest" must not pick it.
    broken = checkpoint.parent / "checkpoint-5"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    resumed = run(
        tiny_argv(tmp_path / "resumed", synthetic_cache, *common, "--resume_from_checkpoint", "latest")
    )
    assert resumed.step == 6
    state = _state(resumed)
    assert state.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    # The logged windows (the card's curves) continue across the resume: every step once, the same losses.
    straight_logs = json.loads((tmp_path / "straight" / "metrics.json").read_text())["logs"]
    resumed_logs = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["logs"]
    assert (
        [entry["step"] for entry in resumed_logs]
        == [entry["step"] for entry in straight_logs]
        == [1, 2, 3, 4, 5, 6]
    )
    for straight, again in zip(straight_logs, resumed_logs):
        assert again["loss"] == pytest.approx(straight["loss"], rel=1e-6), straight["step"]


DRIVER = textwrap.dedent(
    """
    import sys
    import torch
    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    def adaptation(run):
        return next(stage for stage in run.stages if stage.name == "cpsl")

    trainer = Trainer(parse_args(sys.argv[2:]))
    trainer.train()
    state = {
        "student": trainer.student.state_dict(),
        "teacher": adaptation(trainer).teacher.module.state_dict(),
        "selflabel": adaptation(trainer).self_labeling.state_dict(),
        "world": trainer.accelerator.num_processes,
    }
    torch.save(state, f"{sys.argv[1]}/rank{trainer.accelerator.process_index}.pt")
    """
)


@pytest.mark.slow
def test_two_processes_on_cpu_stay_identical(tmp_path, synthetic_cache):
    # Generate the data once here so the two processes only read the cache.
    run(tiny_argv(tmp_path / "warm", synthetic_cache, "--warmup_steps", "1", "--cpsl_steps", "0"))
    run_two_processes(
        DRIVER,
        tmp_path,
        tiny_argv(tmp_path / "ddp", synthetic_cache, "--source_batch_size", "1", "--target_batch_size", "1"),
    )
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["world"] == rank1["world"] == 2  # real data parallelism, not two lone runs
    for part in ("student", "teacher", "selflabel"):
        for name, tensor in rank0[part].items():
            torch.testing.assert_close(rank1[part][name], tensor, rtol=0, atol=0, msg=f"{part}.{name}")
    # Both processes enqueued the gathered samples of both: 2 steps x 2 processes x 1 image x 16 = 64 > 48.
    assert bool(rank0["selflabel"]["bank.valid"].all())
    assert (tmp_path / "ddp" / "model.safetensors").is_file()


def test_bad_configuration_fails_before_training(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/train.py", "--source", "gta5", "--source_dir", str(tmp_path / "missing"),
         "--output_dir", str(tmp_path / "never")],
        capture_output=True, text=True, timeout=120, cwd=REPOSITORY,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--source_dir" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "never").exists()
