"""The stages of a run, built from the arguments in one place (:func:`build_stages`).

Adding a stage is one new file with a :class:`Stage` subclass and one builder in :data:`STAGE_BUILDERS` (a
function ``RunArguments -> list[Stage]`` that reads the stage's own argument group, e.g. ``args.distill``; a
builder returns no stage when its stage is not asked for).
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Stage, StepOutput
from .cpsl import CPSLStage, MeanTeacherStage
from .distill import DistillStage
from .warmup import AdversarialWarmupStage, WarmupStage


def warmup_stages(args) -> list[Stage]:
    adversarial, steps = args.adversarial, args.training.warmup_steps
    if adversarial.warmup_adversarial:
        return [
            AdversarialWarmupStage(
                steps,
                lambda_adv=adversarial.lambda_adv,
                loss_type=adversarial.adversarial_loss,
                discriminator_lr=adversarial.discriminator_lr,
            )
        ]
    return [WarmupStage(steps)]


def adaptation_stages(args) -> list[Stage]:
    stage_class = CPSLStage if args.cpsl.method == "cpsl" else MeanTeacherStage
    training = args.training
    return [
        stage_class(
            args.cpsl,
            training.cpsl_steps,
            lr_scale=training.cpsl_lr_scale,
            export_model=training.export_model,
            eval_teacher=training.eval_teacher,
        )
    ]


def distill_stages(args) -> list[Stage]:
    distill = args.distill
    return [
        DistillStage(
            round_index,
            distill.distill_steps,
            lr_scale=distill.distill_lr_scale,
            init=distill.distill_init,
            threshold=distill.distill_threshold,
            lambda_kl=distill.lambda_distill_kl,
            source_loss=distill.distill_source_loss,
            ignore_cutout=args.cpsl.cutout_labels == "ignore",
        )
        for round_index in range(1, distill.distill_rounds + 1)
    ]


STAGE_BUILDERS: list[Callable] = [warmup_stages, adaptation_stages, distill_stages]
"""The run's stages in order: each builder returns the stages it contributes (possibly none)."""


def build_stages(args) -> list[Stage]:
    """The stages of the run described by ``args``, in order (stages of 0 steps included: they are skipped)."""
    stages = [stage for builder in STAGE_BUILDERS for stage in builder(args)]
    names = [stage.name for stage in stages]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(
            f"two stages of the run share the name {duplicated[0]!r}; stage names must be unique"
        )
    return stages


__all__ = [
    "STAGE_BUILDERS",
    "AdversarialWarmupStage",
    "CPSLStage",
    "DistillStage",
    "MeanTeacherStage",
    "Stage",
    "StepOutput",
    "WarmupStage",
    "build_stages",
]
