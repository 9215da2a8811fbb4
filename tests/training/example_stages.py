"""Stages written the way a user adds one (one class on the :class:`Stage` protocol), used by the tests.

- :class:`ImageMeanStage`: a loss that is a mean over images of per-image terms, with no random draw and the
  network in eval mode, so its gradient cannot depend on how the images are split into batches, processes or
  accumulation steps; one term trains the prototypes ``W`` outside the student's forward, as ``L_SL`` does.
- :class:`EntropyStage`: test-time adaptation on the target alone (TENT-style entropy minimisation of the
  student on the target weak view), the shape of "a new stage after CPSL".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpsl_hf.data.transforms import normalize, to_float
from cpsl_hf.training.stages import Stage, StepOutput

IGNORE = 255


class ImageMeanStage(Stage):
    """``mean over images of (CE of the image's labelled pixels + logsumexp(mean embedding . W))``."""

    def __init__(self, steps: int):
        super().__init__("image_mean", steps)

    def losses(self, source_batch, target_batch) -> StepOutput:
        run = self.run
        run.student.eval()  # no dropout, BatchNorm on its running statistics: nothing depends on the batch
        images, labels = to_float(source_batch["pixel_values"]), source_batch["labels"]
        out = run.model(normalize(images), output_embeddings=True)
        logits = F.interpolate(
            out.logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
        )
        per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
        labelled = (labels != IGNORE).float()
        per_image_ce = (per_pixel * labelled).sum(dim=(1, 2)) / labelled.sum(dim=(1, 2)).clamp_min(1.0)
        embeddings = out.embeddings.detach().float().mean(dim=(2, 3))  # N x D, no graph to the network
        per_image_w = (embeddings @ run.student.self_labeling_head.prototypes.t()).logsumexp(dim=1)
        loss = (per_image_ce + per_image_w).mean()
        return StepOutput({"loss": loss, "loss_image_mean": loss.detach()})


class EntropyStage(Stage):
    """Minimise the mean per-pixel entropy of the student's softmax on the target weak view."""

    needs_source = False
    needs_target = True

    def __init__(self, steps: int):
        super().__init__("entropy", steps)

    def start(self, previous) -> None:
        self.run.reset_optimizer_state()

    def losses(self, source_batch, target_batch) -> StepOutput:
        run = self.run
        weak = run.views.target_weak(target_batch)
        with run.accelerator.autocast():
            logits = run.model(normalize(weak.images)).logits.float()
        entropy = -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()
        return StepOutput({"loss": entropy, "loss_entropy": entropy.detach()})

    def column_title(self, network_name: str) -> str:
        return "entropy minimisation"

    def recipe(self) -> str:
        return f"{self.steps} entropy minimisation"


def add_entropy_stage(args) -> list[Stage]:
    """A stage builder: two steps of :class:`EntropyStage` after the built-in stages."""
    return [EntropyStage(2)]


def student_state(trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.student.state_dict().items()}
