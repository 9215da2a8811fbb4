"""A distillation round (SPEC.md stage 3; the reference's stages 2 and 3): a fresh student learns from the hard
labels of the frozen previous model.

The previous model is the network the previous stage exports (for round 1 the CPSL stage's ``--export_model``,
for later rounds the previous round's student). Its softmax averaged over the target weak view and its mirror
image gives ``P_prev`` and hard labels (argmax; 255 where the confidence is <= ``--distill_threshold`` or
outside the image). The student sees the strong view: ``L = L_src + CE(strong view, hard labels) +
lambda_distill_kl KL(P_prev || P_student)``, the KL over the pixels valid in both views. Each round restarts
the learning-rate schedule and the optimiser state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cpsl_hf.data.protocols import IGNORE_INDEX
from cpsl_hf.data.transforms import normalize
from cpsl_hf.selflabel import masked_cross_entropy, one_way_kl
from cpsl_hf.training.pseudo_labels import flip_averaged_probabilities, frozen_copy, hard_pseudo_labels
from cpsl_hf.training.views import cross_entropy_at, labels_to_strong_view, maps_to_strong_view, resize_mask

from .base import Stage, StepOutput


class DistillStage(Stage):
    """Round ``round_index`` (1-based) of self-distillation.

    Args:
        round_index: the round's number; the stage is called ``distill<round_index>``.
        steps: iterations of the round.
        lr_scale: learning-rate scale of the round (``--distill_lr_scale``).
        init: ``pretrained`` (the student restarts from the run's initial weights) or ``previous`` (from the
            previous model's).
        threshold: hard labels need a confidence above it.
        lambda_kl: weight of ``KL(P_prev || P_student)``.
        source_loss: keep ``L_src`` (``--no_distill_source_loss`` drops it and the source stream).
        ignore_cutout: hard labels inside the strong view's cutout box are ignored (``--cutout_labels``).
    """

    needs_target = True

    def __init__(
        self,
        round_index: int,
        steps: int,
        lr_scale: float,
        init: str,
        threshold: float,
        lambda_kl: float,
        source_loss: bool,
        ignore_cutout: bool,
    ):
        super().__init__(f"distill{round_index}", steps, lr_scale)
        self.round_index = round_index
        self.init = init
        self.threshold = threshold
        self.lambda_kl = lambda_kl
        self.needs_source = source_loss
        self.ignore_cutout = ignore_cutout
        self.previous_model: nn.Module | None = None
        self.initial_weights: dict[str, torch.Tensor] | None = None

    def setup(self, run) -> None:
        """With ``init`` pretrained, keep the run's initial weights on the CPU, one copy shared by every round (set
        up before any step; on a resume they are rebuilt identically: same seed, and loading the data draws
        nothing from the global generator)."""
        super().setup(run)
        if self.init != "pretrained":
            return
        earlier = [stage for stage in run.stages if isinstance(stage, DistillStage) and stage.initial_weights]
        self.initial_weights = (
            earlier[0].initial_weights
            if earlier
            else {
                name: value.detach().to("cpu", copy=True) for name, value in run.student.state_dict().items()
            }
        )

    @torch.no_grad()
    def start(self, previous: Stage | None) -> None:
        """Freeze the previous stage's exported network (the student when no stage ran yet) and give the student
        its fresh start, with an empty optimiser state."""
        student = self.run.student
        previous_network = student if previous is None else previous.exported()[1]
        self.previous_model = frozen_copy(previous_network)
        if self.init == "pretrained":
            student.load_state_dict(self.initial_weights)
        else:
            student.load_state_dict(self.previous_model.state_dict())
        self.run.reset_optimizer_state()

    def finish(self) -> None:
        self.previous_model = None
        self.initial_weights = None

    def losses(self, source_batch, target_batch) -> StepOutput:
        run = self.run
        source = None if source_batch is None else run.views.source(source_batch)
        weak, strong = run.views.target(target_batch)

        with torch.no_grad(), run.accelerator.autocast():
            previous_probs = flip_averaged_probabilities(self.previous_model, normalize(weak.images))
        decode_size = tuple(previous_probs.shape[-2:])
        weak_valid = resize_mask(weak.valid_mask, decode_size)
        labels_weak = hard_pseudo_labels(previous_probs, self.threshold, weak_valid)

        student_inputs = [strong.images] if source is None else [source.images, strong.images]
        with run.accelerator.autocast():
            logits = run.model(normalize(torch.cat(student_inputs))).logits
        num_target = strong.images.shape[0]
        target_logits = logits[logits.shape[0] - num_target :]

        labels_strong = labels_to_strong_view(
            labels_weak, strong, decode_size, ignore_cutout=self.ignore_cutout
        )
        warped, kl_valid = maps_to_strong_view(previous_probs, weak_valid, strong, decode_size)
        # log P_prev as logits: one_way_kl's log-softmax of it is log P_prev again (the clamp only keeps log 0
        # finite).
        previous_log_probs = warped.clamp_min(torch.finfo(torch.float32).tiny).log()

        loss_target = masked_cross_entropy(target_logits, labels_strong, IGNORE_INDEX)
        loss_kl = one_way_kl(previous_log_probs, target_logits, kl_valid)
        loss = loss_target + self.lambda_kl * loss_kl
        losses = {"loss_target": loss_target.detach(), "loss_kl": loss_kl.detach()}
        if source is not None:
            loss_source = cross_entropy_at(logits[: source.images.shape[0]], source.labels)
            loss = loss + loss_source
            losses["loss_source"] = loss_source.detach()
        labelled = (labels_weak != IGNORE_INDEX).float().sum()
        losses["pseudo_label_share"] = labelled / weak_valid.float().sum().clamp_min(1.0)
        return StepOutput({"loss": loss, **losses})

    def recipe(self) -> str:
        start = "the initial weights" if self.init == "pretrained" else "the previous model"
        return (
            f"{self.steps} distillation (a fresh student from {start}; hard labels of confidence > "
            f"{self.threshold}, KL weight {self.lambda_kl})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "previous_model": None if self.previous_model is None else self.previous_model.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["previous_model"] is not None:
            self.previous_model = frozen_copy(self.run.student)
            self.previous_model.load_state_dict(state["previous_model"])
        if self.finished:
            self.initial_weights = None
