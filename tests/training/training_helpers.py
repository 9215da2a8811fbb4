"""Shared by the trainer tests: the argument list of a tiny synthetic run and a one-call run.

Later flags win in ``HfArgumentParser``, so a test changes any default by passing the flag again in ``extra``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F

from cpsl_hf.data.transforms import normalize
from cpsl_hf.training.arguments import parse_args
from cpsl_hf.training.building import build_model
from cpsl_hf.training.loop import Trainer

REPOSITORY = Path(__file__).resolve().parents[2]

FINAL_STATE_DRIVER = textwrap.dedent(
    """
    import sys
    import torch
    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    trainer = Trainer(parse_args(sys.argv[2:]))
    trainer.train()
    cpsl = trainer.stages[1]
    state = {
        "student": trainer.student.state_dict(),
        "teacher": cpsl.teacher.module.state_dict(),
        "selflabel": None if cpsl.self_labeling is None else cpsl.self_labeling.state_dict(),
        "step": trainer.step,
        "history": trainer.history,
    }
    torch.save(state, f"{sys.argv[1]}/rank{trainer.accelerator.process_index}.pt")
    """
)
"""A ``run_two_processes`` driver: train, then save each rank's student, teacher, self-labeling state (None
before the CPSL stage started), step and history to ``<folder>/rank<R>.pt``."""


def tiny_argv(output_dir, cache, *extra):
    """2 warm-up + 2 CPSL steps on 8 + 8 synthetic images of 32 x 64 (4 validation), 32 x 32 crops, batch
    2 + 2, 16 samples per image, a bank of 48; ``extra`` flags come last and override."""
    return [
        "--output_dir", str(output_dir),
        "--synthetic_cache_dir", str(cache),
        "--synthetic_train_images", "8",
        "--synthetic_val_images", "4",
        "--synthetic_image_size", "32", "64",
        "--crop_size", "32", "32",
        "--source_batch_size", "2",
        "--target_batch_size", "2",
        "--eval_batch_size", "4",
        "--samples_per_image", "16",
        "--bank_size", "48",
        "--warmup_steps", "2",
        "--cpsl_steps", "2",
        "--lr_warmup_steps", "0",
        "--logging_steps", "1",
        "--no_progress_bar",
        *extra,
    ]  # fmt: skip


def run(argv, trainer_class=Trainer) -> Trainer:
    """Parse ``argv``, train to the end (or ``--stop_at_step``), return the trainer."""
    trainer = trainer_class(parse_args(argv))
    trainer.train()
    return trainer


def run_two_processes(driver_source: str, folder, argv, extra_env=None) -> subprocess.CompletedProcess:
    """Write ``driver_source`` to ``folder/driver.py`` and run it under ``torchrun`` as 2 gloo processes (one
    thread each) with the arguments ``folder *argv``; asserts success and returns the finished process."""
    driver = Path(folder) / "driver.py"
    driver.write_text(driver_source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY), **(extra_env or {})}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(driver), str(folder), *argv,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# ------------------------------------------------------------------ one adaptation step, recomputed
def prepared(tmp_path, cache, *flags) -> Trainer:
    """A set-up trainer right after the start of its adaptation stage (1 warm-up step, untrained), student in
    eval mode so that its forward is deterministic (no dropout / drop path) and can be recomputed. The stage is
    ``adaptation(trainer)``."""
    trainer = Trainer(parse_args(tiny_argv(tmp_path, cache, "--warmup_steps", "1", *flags)))
    trainer.setup()
    stage = adaptation(trainer)
    stage.start(trainer.stages[0])
    stage.started = True
    trainer.model.eval()
    return trainer


def stage_named(trainer: Trainer, name: str):
    return next(stage for stage in trainer.stages if stage.name == name)


def adaptation(trainer: Trainer):
    """The run's CPSL (or mean-teacher) stage."""
    return stage_named(trainer, "cpsl")


def distill_round(trainer: Trainer) -> int:
    """The distillation round the run is in (0 before the first)."""
    rounds = [
        stage.round_index for stage in trainer.stages if stage.name.startswith("distill") and stage.started
    ]
    return max(rounds, default=0)


def current_round(trainer: Trainer):
    """The stage of the distillation round the run is in."""
    return stage_named(trainer, f"distill{distill_round(trainer)}")


def cpsl_losses(trainer: Trainer, source, target):
    """``(losses, pseudo-label record)`` of one step of the adaptation stage."""
    output = adaptation(trainer).losses(source, target)
    return output.losses, output.pseudo_labels


def batches(trainer: Trainer):
    source = trainer.next_batch(trainer.source_loader)
    target = trainer.next_batch(trainer.target_loader)
    return source, target, target.pop("labels")


def step_and_views(trainer: Trainer, source, target):
    """(losses, record) of one step and the same step's views, redrawn from the same generator state."""
    generator = trainer.views.generator
    state = generator.get_state()
    losses, record = cpsl_losses(trainer, source, target)
    after = generator.get_state()
    generator.set_state(state)
    views = trainer.views.source(source), *trainer.views.target(target)
    generator.set_state(after)
    return losses, record, views


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def independent_model(trainer: Trainer, state: dict) -> torch.nn.Module:
    model = build_model(trainer.args)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def probabilities(model, images) -> torch.Tensor:
    return model(normalize(images)).logits.float().softmax(dim=1)


def nearest(mask: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0.5
