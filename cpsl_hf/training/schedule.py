"""The learning-rate schedule: every stage restarts a linear warm-up then a poly decay, at its own scale."""

from __future__ import annotations

from collections.abc import Sequence


def schedule_lr_factor(
    step: int, stage_lengths: Sequence[int], stage_scales: Sequence[float], lr_warmup_steps: int, power: float
) -> float:
    """Learning-rate multiplier at global ``step`` for consecutive stages of ``stage_lengths`` steps.

    Every stage restarts the schedule (the reference trains its stages as separate runs): a linear warm-up over
    ``lr_warmup_steps``, then ``(1 - stage_step / stage_length) ** power``, times the stage's scale. Stages of 0
    steps are skipped; past the last stage the factor is that of its end (0).
    """
    if len(stage_lengths) != len(stage_scales):
        raise ValueError("schedule_lr_factor: one scale per stage is needed")
    stage_start, stage_length, scale = 0, 1, 1.0
    start = 0
    for length, stage_scale in zip(stage_lengths, stage_scales, strict=True):
        if length > 0:
            stage_start, stage_length, scale = start, length, stage_scale
            if step < start + length:
                break
        start += length
    stage_step = step - stage_start
    ramp = min(1.0, (stage_step + 1) / lr_warmup_steps) if lr_warmup_steps > 0 else 1.0
    return scale * ramp * max(0.0, 1.0 - stage_step / stage_length) ** power


def stage_lr_factor(
    step: int,
    warmup_steps: int,
    cpsl_steps: int,
    lr_warmup_steps: int,
    power: float,
    cpsl_lr_scale: float,
    distill_steps: int = 0,
    distill_rounds: int = 0,
    distill_lr_scale: float = 1.0,
) -> float:
    """Learning-rate multiplier at global ``step``: per stage (warm-up, CPSL, each distillation round), a
    linear warm-up then a poly decay (:func:`schedule_lr_factor`). CPSL runs at ``cpsl_lr_scale`` and the
    distillation rounds at ``distill_lr_scale`` times the warm-up rates."""
    return schedule_lr_factor(
        step,
        [warmup_steps, cpsl_steps] + [distill_steps] * distill_rounds,
        [1.0, cpsl_lr_scale] + [distill_lr_scale] * distill_rounds,
        lr_warmup_steps,
        power,
    )
