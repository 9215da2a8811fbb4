"""Shared by the trainer tests: the argument list of a tiny synthetic run and a one-call run.

Later flags win in ``HfArgumentParser``, so a test changes any default by passing the flag again in ``extra``.
"""

from __future__ import annotations

from cpsl_hf.training.arguments import parse_args
from cpsl_hf.training.trainer import UDATrainer


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


def run(argv, trainer_class=UDATrainer) -> UDATrainer:
    """Parse ``argv``, train to the end (or ``--stop_at_step``), return the trainer."""
    trainer = trainer_class(parse_args(argv))
    trainer.train()
    return trainer
