"""The adaptation stage (SPEC.md): CPSL, and the built-in mean-teacher baseline (the same stage without
self-labeling).

One step, ``L = L_src + L_tgt + lambda_sl L_SL + lambda_reg L_REG``, in named parts:

1. :meth:`CPSLStage.teacher_targets`: the EMA teacher on the target weak view (embeddings ``z'``, logits) and
   ``P_ST`` from ``--pseudo_labels`` (the frozen warm-up model, the stored maps, or the teacher itself).
2. :meth:`CPSLStage.student_forward`: one student pass over the source crop, the target strong view (with
   source pixels pasted in, ``--mix``) and, when ``L_SL`` may reach them, the weak view's embeddings.
3. :meth:`CPSLStage.weak_view_labels`: CPSL: ``z'``, ``P_ST`` -> :class:`SelfLabeling` -> rectified labels
   ``argmax P_SL P_ST`` and ``L_SL``; mean teacher: ``argmax P_ST`` above ``--pseudo_label_threshold``; at
   ``--pseudo_label_resolution``.
4. :meth:`CPSLStage.labels_on_strong_view`: the labels warped onto the strong view, the cutout box and the
   mixed-in source pixels handled.
5. :meth:`CPSLStage.total_loss`: ``L_src``, ``L_tgt`` (CE, or CE + RCE) and the consistency ``L_REG``
   (``--consistency``): ``reference``, KL(P_w || P_s) of the self-labeling head with the EMA prototypes
   ``W'`` on both sides; ``symmetric``, both KL directions of the segmentation softmax; over pixels valid in
   both views and outside the cutout box and the mixed-in pixels.

Every mode choice is made once, when the stage is built.

When it starts, the EMA teacher becomes a copy of the warm-up model, and so does the frozen ``P_ST`` model
(``--pseudo_labels frozen``); one pass of the teacher over the target training set gives the prototypes
``W`` = ``W'`` (class means of the embeddings under argmax ``P_ST``, all-reduced), the class prior (histogram
of argmax ``P_ST``, + 1) and, with ``--pseudo_labels offline``, the stored ``P_ST`` maps (float16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cpsl_hf.data.protocols import IGNORE_INDEX
from cpsl_hf.data.transforms import StrongView, WeakView, class_mix, cut_mix, normalize, to_float
from cpsl_hf.selflabel import (
    PrototypeAccumulator,
    SelfLabeling,
    SelfLabelingOutput,
    class_argmax,
    class_histogram,
    cosine_logits,
    masked_cross_entropy,
    one_way_kl,
    symmetric_kl,
)
from cpsl_hf.selflabel.losses import symmetric_ce_loss
from cpsl_hf.training.diagnostics import PseudoLabelRecord
from cpsl_hf.training.ema import EMATeacher
from cpsl_hf.training.pseudo_labels import OfflinePseudoLabels, frozen_copy, hard_pseudo_labels
from cpsl_hf.training.views import (
    cross_entropy_at,
    downsample_labels,
    labels_to_strong_view,
    maps_to_strong_view,
    resize_mask,
    upsampled,
)

from .base import Stage, StepOutput

DIAGNOSTIC_NAMES = ("changed_share", "sl_agreement", "top2_margin", "prior_entropy", "bank_fill")
"""Self-labeling diagnostics logged every window (see :class:`cpsl_hf.selflabel.SelfLabelingOutput`)."""


@dataclass
class TeacherTargets:
    """What the teacher side gives for a target batch, at the decoder's resolution h x w.

    Attributes:
        embeddings: N x D x h x w EMA-teacher embeddings ``z'``.
        logits: N x C x h x w float32 EMA-teacher logits.
        p_st: N x C x h x w float32 ``P_ST``.
        valid: N x h x w bool, pixels inside the weak view's image (and with a stored ``P_ST``).
    """

    embeddings: torch.Tensor
    logits: torch.Tensor
    p_st: torch.Tensor
    valid: torch.Tensor

    @property
    def decode_size(self) -> tuple[int, int]:
        return tuple(self.logits.shape[-2:])


@dataclass
class StudentOutputs:
    """One student pass: logits N x C x h x w of the source crop and of the (mixed) strong view; embeddings
    N x D x h x w of the strong view and of the weak view when they were asked for; the mix mask (N x H x W
    bool, True where source pixels were pasted) or None."""

    source_logits: torch.Tensor
    target_logits: torch.Tensor
    strong_embeddings: torch.Tensor | None
    weak_embeddings: torch.Tensor | None
    mix_mask: torch.Tensor | None


@dataclass
class WeakViewLabels:
    """The labels the target loss trains on, on the weak view at ``size``, and what produced them."""

    labels: torch.Tensor
    size: tuple[int, int]
    record: PseudoLabelRecord
    self_labeling: SelfLabelingOutput | None = None


class CPSLStage(Stage):
    """Student + EMA teacher on weak / strong target views with rectified pseudo labels and ``L_SL``.

    Args:
        cpsl: the :class:`~cpsl_hf.training.arguments.CPSLArguments` of the run.
        steps: iterations of the stage.
        lr_scale: learning-rate scale of the stage (``--cpsl_lr_scale``).
        export_model: ``student`` or ``teacher``, the network exported when this is the last stage.
        eval_teacher: also evaluate the EMA teacher.
    """

    needs_target = True
    title = "CPSL"

    def __init__(self, cpsl, steps: int, lr_scale: float, export_model: str, eval_teacher: bool):
        super().__init__("cpsl", steps, lr_scale)
        self.cpsl = cpsl
        self.export_model = export_model
        self.eval_teacher = eval_teacher
        self.self_labeling: SelfLabeling | None = None
        self.offline_labels: OfflinePseudoLabels | None = None
        self.pseudo_label_model: nn.Module | None = None
        # The mode choices, once.
        self.p_st_of = {
            "teacher": self._p_st_of_teacher,
            "frozen": self._p_st_of_frozen_model,
            "offline": self._p_st_of_stored_maps,
        }[cpsl.pseudo_labels]
        self.target_loss = masked_cross_entropy if cpsl.target_loss == "ce" else _symmetric_ce
        self.consistency_pair = {
            "reference": self._reference_pair,
            "symmetric": self._symmetric_pair,
            "none": None,
        }[cpsl.consistency]
        self.consistency_kl = one_way_kl if cpsl.consistency == "reference" else symmetric_kl
        self.student_embeddings_needed = cpsl.consistency == "reference" or cpsl.sl_grad_to_student_embeddings
        self.mixer = {"classmix": class_mix, "cutmix": cut_mix, "none": None}[cpsl.mix]
        self.ignore_cutout = cpsl.cutout_labels == "ignore"

    # ------------------------------------------------------------------ life cycle
    def setup(self, run) -> None:
        super().setup(run)
        self.teacher = EMATeacher(run.student, momentum=self.cpsl.ema_momentum, ramp=self.cpsl.ema_ramp)
        self.teacher.to(run.device)
        self.teacher_encode = run.compiled(self.teacher.module.encode)  # the EMA moves its weights in place

    @torch.no_grad()
    def start(self, previous: Stage | None) -> None:
        """Teacher (and the frozen ``P_ST`` model) <- the warm-up student; prototypes, prior and stored maps
        from one pass over the target set (:meth:`target_pass`), which leaves the global RNG untouched; a fresh
        optimiser state (the reference trains its stages as separate runs)."""
        with torch.random.fork_rng(devices=[]):
            student = self.run.student
            self.teacher.reset(student)
            if self.needs_target_pass():
                self.target_pass()
            if self.cpsl.pseudo_labels == "frozen":
                # The whole warm-up model, prototypes included (only its logits serve).
                self._set_pseudo_label_model(frozen_copy(student))
            self.run.reset_optimizer_state()

    def needs_target_pass(self) -> bool:
        return True

    def _set_pseudo_label_model(self, model: nn.Module) -> None:
        self.pseudo_label_model = model
        self.pseudo_label_forward = self.run.compiled(model)

    def build_self_labeling(self) -> SelfLabeling:
        cpsl, run = self.cpsl, self.run
        core = SelfLabeling(
            num_classes=run.num_classes,
            embedding_dim=run.embedding_dim,
            num_samples=cpsl.samples_per_image,
            bank_size=cpsl.bank_size,
            temperature=run.student.self_labeling_head.temperature,
            epsilon=cpsl.sinkhorn_epsilon,
            sinkhorn_iterations=cpsl.sinkhorn_iterations,
            prior_momentum=cpsl.prior_momentum,
            static_prior=cpsl.prior != "dynamic",
            sampling=cpsl.sampling,
            rectify_threshold=cpsl.rectify_threshold,
            rectification=cpsl.rectification,
            logits_branch=cpsl.sl_logits_branch,
        ).to(run.device)
        core.record_updates = True  # a non-finite step's bank and prior updates are undone (after_micro_step)
        return core

    def target_pass(self) -> None:
        """One pass of the teacher (= the warm-up model) over the target training set: W = W' = class means of
        its embeddings under argmax ``P_ST`` (a class no pixel was assigned to keeps its random, normalised
        prototype), the prior from the histogram of argmax ``P_ST`` (+ 1: no class starts with zero mass), and
        the stored ``P_ST`` maps (``--pseudo_labels offline``)."""
        run, cpsl = self.run, self.cpsl
        self_labeling = self.self_labeling_enabled
        accumulator = PrototypeAccumulator(run.num_classes, run.embedding_dim).to(run.device)
        histogram = torch.zeros(run.num_classes, device=run.device)
        stored, names = [], []
        for batch in run.progress(run.target_train_pass_loader(cpsl.init_max_images), "init"):
            images = batch["pixel_values"].to(run.device, non_blocking=True)
            with run.accelerator.autocast():
                out = self.teacher(normalize(to_float(images)), output_embeddings=self_labeling)
            probs = out.logits.float().softmax(dim=1)
            if self_labeling:
                accumulator.update(out.embeddings.float(), probs)
                histogram += class_histogram(class_argmax(probs), run.num_classes)
            if cpsl.pseudo_labels == "offline":
                stored.append(OfflinePseudoLabels.compress(probs).cpu())
                names.extend(batch["name"])
        if self_labeling:
            accumulator.all_reduce()
            self._initialize_self_labeling(accumulator, run.accelerator.reduce(histogram, reduction="sum"))
        if cpsl.pseudo_labels == "offline":
            self.offline_labels = _gather_offline(run.accelerator, stored, names)

    def _initialize_self_labeling(self, accumulator: PrototypeAccumulator, histogram: torch.Tensor) -> None:
        student = self.run.student
        prototypes = accumulator.compute(normalize=True)
        # A class no pixel went to, or whose mean is not finite (a diverged warm-up), keeps its random prototype.
        unseen = (accumulator.counts == 0) | ~torch.isfinite(prototypes).all(dim=1)
        prototypes = torch.where(
            unseen[:, None], F.normalize(student.self_labeling_head.prototypes.float(), dim=1), prototypes
        )
        student.self_labeling_head.prototypes.copy_(prototypes)
        self.teacher.module.self_labeling_head.prototypes.copy_(prototypes)
        self.self_labeling = self.build_self_labeling()
        if self.cpsl.prior != "uniform":  # uniform: the built prior, 1/C, for ever
            self.self_labeling.initialize_prior(histogram + 1.0)

    @property
    def self_labeling_enabled(self) -> bool:
        return True

    def after_micro_step(self, output: StepOutput) -> None:
        """Keep the core's bank and prior updates of the step's forwards, or undo them if it was non-finite."""
        if self.self_labeling is not None and self.run.accelerator.sync_gradients:
            self.self_labeling.settle_updates(self.run.step_finite)

    def after_step(self) -> None:
        """The EMA teacher follows the student, unless the step was non-finite (then nothing moves)."""
        self.teacher.update(self.run.student, self.run.step_finite)

    # ------------------------------------------------------------------ the step
    def losses(self, source_batch, target_batch) -> StepOutput:
        run = self.run
        source = run.views.source(source_batch)
        weak, strong = run.views.target(target_batch)
        targets = self.teacher_targets(weak, target_batch["name"])
        student = self.student_forward(source, strong, weak)
        weak_labels = self.weak_view_labels(targets, weak, student)
        labels_strong, strong_valid = self.labels_on_strong_view(
            weak_labels, strong, source, student, targets
        )
        losses = self.total_loss(source, targets, student, weak_labels, strong, labels_strong, strong_valid)
        return StepOutput(losses, weak_labels.record)

    def teacher_targets(self, weak: WeakView, names: list[str]) -> TeacherTargets:
        """EMA teacher on the weak view (``--teacher_mode``) and ``P_ST`` (``--pseudo_labels``)."""
        run = self.run
        with (
            torch.no_grad(),
            run.accelerator.autocast(),
            self.teacher.mode(self.cpsl.teacher_mode == "train"),
        ):
            embeddings, logits = self.teacher_encode(normalize(weak.images))
        logits = logits.float()
        weak_valid = resize_mask(weak.valid_mask, tuple(logits.shape[-2:]))
        p_st, valid = self.p_st_of(weak, names, logits, weak_valid)
        return TeacherTargets(embeddings, logits, p_st, valid)

    def _p_st_of_teacher(self, weak, names, teacher_logits, weak_valid):
        return teacher_logits.softmax(dim=1), weak_valid

    def _p_st_of_frozen_model(self, weak, names, teacher_logits, weak_valid):
        with torch.no_grad(), self.run.accelerator.autocast():
            logits = self.pseudo_label_forward(normalize(weak.images)).logits
        return logits.float().softmax(dim=1), weak_valid

    def _p_st_of_stored_maps(self, weak, names, teacher_logits, weak_valid):
        p_st, stored_valid = self.offline_labels.lookup(
            names, weak.params, tuple(teacher_logits.shape[-2:]), self.run.device
        )
        return p_st, weak_valid & stored_valid

    def student_forward(self, source: WeakView, strong: StrongView, weak: WeakView) -> StudentOutputs:
        """Source crop, strong view (mixed with source pixels, ``--mix``) and, with
        ``--sl_grad_to_student_embeddings``, the weak view, in one student pass."""
        run = self.run
        target_images, mix_mask = strong.images, None
        if self.mixer is not None:
            # The mixed image's target labels are only known after the pseudo labels, so the mask is drawn here
            # (from the source labels) and applied to images now, to labels in labels_on_strong_view.
            mixed = self.mixer(
                source.images,
                source.labels,
                strong.images,
                torch.full_like(source.labels, IGNORE_INDEX),
                generator=run.views.generator,
                p=self.cpsl.mix_prob,
            )
            target_images, mix_mask = mixed.images, mixed.mask
        inputs = [source.images, target_images]
        if self.cpsl.sl_grad_to_student_embeddings:
            inputs.append(weak.images)
        with run.accelerator.autocast():
            out = run.model(normalize(torch.cat(inputs)), output_embeddings=self.student_embeddings_needed)
        num_source, num_target = source.images.shape[0], strong.images.shape[0]
        embeddings = out.embeddings if self.student_embeddings_needed else None
        return StudentOutputs(
            source_logits=out.logits[:num_source],
            target_logits=out.logits[num_source : num_source + num_target],
            strong_embeddings=None
            if embeddings is None
            else embeddings[num_source : num_source + num_target],
            weak_embeddings=embeddings[num_source + num_target :]
            if self.cpsl.sl_grad_to_student_embeddings
            else None,
            mix_mask=mix_mask,
        )

    def self_label(self, targets: TeacherTargets, student: StudentOutputs) -> SelfLabelingOutput:
        """The self-labeling core on the teacher's weak-view pixels (updates the bank and prior)."""
        return self.self_labeling(
            teacher_embeddings=targets.embeddings,
            p_st=targets.p_st,
            teacher_prototypes=self.teacher.module.self_labeling_head.prototypes,
            student_prototypes=self.run.student.self_labeling_head.prototypes,
            student_embeddings=student.weak_embeddings,
            teacher_logits=targets.logits if self.cpsl.sl_logits_branch else None,
            valid_mask=targets.valid,
            generator=self.run.views.generator,
        )

    def label_size(self, targets: TeacherTargets, weak: WeakView) -> tuple[int, int]:
        """``--pseudo_label_resolution``: the decoder's (the reference) or the crop's, where thin structures
        keep their pixels."""
        if self.cpsl.pseudo_label_resolution == "decode":
            return targets.decode_size
        return tuple(weak.images.shape[-2:])

    def weak_view_labels(
        self, targets: TeacherTargets, weak: WeakView, student: StudentOutputs
    ) -> WeakViewLabels:
        """Rectified labels ``argmax P_SL P_ST`` at the label size (``P_ST`` and ``P_SL`` upsampled bilinearly
        first when it is the crop's), with ``L_SL`` from the core."""
        result = self.self_label(targets, student)
        size = self.label_size(targets, weak)
        valid = self._label_valid(targets, weak, size)
        p_st = upsampled(targets.p_st, size)
        p_sl = upsampled(result.sl_probs, size)
        if size == targets.decode_size:
            labels = result.labels
        else:
            labels = self.self_labeling.pseudo_labels(p_sl, p_st, valid)
        return WeakViewLabels(labels, size, _record(weak, p_st, labels, valid, p_sl), result)

    @staticmethod
    def _label_valid(targets: TeacherTargets, weak: WeakView, size: tuple[int, int]) -> torch.Tensor:
        valid = resize_mask(targets.valid, size)
        if size != targets.decode_size:
            valid = valid & weak.valid_mask
        return valid

    def labels_on_strong_view(
        self, weak_labels: WeakViewLabels, strong: StrongView, source: WeakView, student, targets
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The weak view's labels on the strong view (at the label size; the source's labels where source pixels
        were mixed in) and the strong view's pixels where the consistency applies (decoder resolution)."""
        size, decode_size = weak_labels.size, targets.decode_size
        labels = labels_to_strong_view(weak_labels.labels, strong, size, ignore_cutout=self.ignore_cutout)
        strong_valid = resize_mask(strong.valid_mask, decode_size) & ~resize_mask(
            strong.cutout_mask, decode_size
        )
        if student.mix_mask is not None:
            labels = torch.where(
                resize_mask(student.mix_mask, size), downsample_labels(source.labels, size), labels
            )
            strong_valid = strong_valid & ~resize_mask(student.mix_mask, decode_size)
        return labels, strong_valid

    def total_loss(
        self, source, targets, student, weak_labels, strong, labels_strong, strong_valid
    ) -> dict[str, torch.Tensor]:
        """``L_src + L_tgt (+ lambda_sl L_SL) (+ lambda_reg L_REG)``: ``loss`` with its graph, the parts
        detached, and the self-labeling diagnostics."""
        cpsl = self.cpsl
        loss_source = cross_entropy_at(student.source_logits, source.labels)
        loss_target = self.target_loss(upsampled(student.target_logits, weak_labels.size), labels_strong)
        loss = loss_source + loss_target
        losses: dict[str, torch.Tensor] = {}
        result = weak_labels.self_labeling
        if result is not None:
            losses["loss_sl"] = result.loss.detach()
            losses.update({name: result.diagnostics[name].detach() for name in DIAGNOSTIC_NAMES})
            loss = loss + cpsl.lambda_sl * result.loss
        if self.consistency_pair is not None:
            reference_weak, reference_strong = self.consistency_pair(targets, student, result)
            warped, valid = maps_to_strong_view(reference_weak, targets.valid, strong, targets.decode_size)
            loss_reg = self.consistency_kl(warped, reference_strong, valid & strong_valid)
            loss = loss + cpsl.lambda_reg * loss_reg
            losses["loss_reg"] = loss_reg.detach()
        losses.update(loss=loss, loss_source=loss_source.detach(), loss_target=loss_target.detach())
        return losses

    def _reference_pair(self, targets, student, result):
        """cos(z, W') / tau on both sides: the teacher's on the weak view (the core's ``P_SL`` logits), the
        student's on the strong view; W' is the EMA of W and no optimiser's parameter."""
        prototypes = self.teacher.module.self_labeling_head.prototypes.detach()
        strong = cosine_logits(student.strong_embeddings, prototypes, self.self_labeling.temperature)
        return result.sl_logits, strong

    def _symmetric_pair(self, targets, student, result):
        return targets.logits, student.target_logits

    # ------------------------------------------------------------------ evaluation, export, checkpoints
    def evaluation_networks(self) -> dict[str, nn.Module]:
        networks = {"student": self.run.student}
        if self.started and self.eval_teacher:
            networks["teacher"] = self.teacher.module
        return networks

    def exported(self) -> tuple[str, nn.Module]:
        if self.export_model == "teacher":
            return "teacher", self.teacher.module
        return "student", self.run.student

    def column_title(self, network_name: str) -> str:
        return f"{self.title.lower()} {network_name}"

    def recipe(self) -> str:
        return f"{self.steps} {self.title}"

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "teacher": self.teacher.state_dict(),
            "self_labeling": None if self.self_labeling is None else self.self_labeling.state_dict(),
            "offline_labels": None if self.offline_labels is None else self.offline_labels.state_dict(),
            "pseudo_label_model": None
            if self.pseudo_label_model is None
            else self.pseudo_label_model.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.teacher.load_state_dict(state["teacher"])
        if state["self_labeling"] is not None:
            self.self_labeling = self.build_self_labeling()
            self.self_labeling.load_state_dict(state["self_labeling"])
        if state["offline_labels"] is not None:
            self.offline_labels = OfflinePseudoLabels.from_state_dict(state["offline_labels"])
        if state["pseudo_label_model"] is not None:
            self._set_pseudo_label_model(frozen_copy(self.run.student))
            self.pseudo_label_model.load_state_dict(state["pseudo_label_model"])


class MeanTeacherStage(CPSLStage):
    """The same stage without self-labeling (the built-in baseline): labels ``argmax P_ST``, dropping pixels at
    or below ``--pseudo_label_threshold``; no ``L_SL``, no prototype initialisation."""

    title = "mean-teacher"

    def needs_target_pass(self) -> bool:
        return self.cpsl.pseudo_labels == "offline"

    @property
    def self_labeling_enabled(self) -> bool:
        return False

    def weak_view_labels(
        self, targets: TeacherTargets, weak: WeakView, student: StudentOutputs
    ) -> WeakViewLabels:
        size = self.label_size(targets, weak)
        valid = self._label_valid(targets, weak, size)
        p_st = upsampled(targets.p_st, size)
        labels = hard_pseudo_labels(p_st, self.cpsl.pseudo_label_threshold, valid)
        return WeakViewLabels(labels, size, _record(weak, p_st, labels, valid, None))


def _symmetric_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``--target_loss ce+rce``: the symmetric cross-entropy of :func:`symmetric_ce_loss` in float32."""
    return symmetric_ce_loss(logits.float(), labels, ignore_index=IGNORE_INDEX)


def _record(weak, p_st, labels, valid, p_sl) -> PseudoLabelRecord:
    """The step's labels for the pseudo-label monitor (255 outside the valid pixels)."""
    outside = torch.full_like(labels, IGNORE_INDEX)
    return PseudoLabelRecord(
        params=weak.params,
        p_st_labels=torch.where(valid, class_argmax(p_st), outside),
        pseudo_labels=labels,
        valid=valid,
        p_sl_labels=None if p_sl is None else torch.where(valid, class_argmax(p_sl), outside),
    )


def _gather_offline(accelerator, stored: list[torch.Tensor], names: list[str]) -> OfflinePseudoLabels:
    """Every process ends with the ``P_ST`` maps of the whole target set (each computed its shard)."""
    from accelerate.utils import gather_object

    if not stored:
        raise ValueError("--pseudo_labels offline: the target training set is empty")
    shapes = {tuple(t.shape[1:]) for t in stored}
    if len(shapes) != 1:
        raise ValueError("--pseudo_labels offline needs target images of one size; set --target_resize H W")
    local = torch.cat(stored)
    if accelerator.num_processes > 1:
        parts = gather_object([(names, local)])
        names = [name for part_names, _ in parts for name in part_names]
        local = torch.cat([tensor for _, tensor in parts])
    return OfflinePseudoLabels(names, local)
