"""The UDA trainer: source warm-up, CPSL initialisation, CPSL self-training, evaluation and export, on Accelerate.

It reads like ``transformers``' ``run_semantic_segmentation_no_trainer.py``: build the ``Accelerator``, the
datasets, the model and the optimizer, ``prepare`` them, loop over steps under ``accumulate`` and
``autocast``, log through the trackers, evaluate, save. The CPSL step (SPEC.md) lives in one method,
:meth:`UDATrainer.cpsl_losses`.

Stages, counted in global optimisation steps over endless source and target streams:

1. ``warmup`` (steps ``[0, warmup_steps)``): the student learns from the source only (cross-entropy); with
   ``--warmup_adversarial`` also to fool an output-space discriminator on target crops (AdaptSegNet), which
   trains beside it (:meth:`UDATrainer.adversarial_warmup_losses`).
2. ``init`` (once, when the CPSL stage starts): the EMA teacher becomes a copy of the warm-up model, and so
   does the frozen ``P_ST`` model (``--pseudo_labels frozen``); one pass of the teacher over the target
   training set gives the prototypes ``W`` = ``W'`` (class means of the embeddings under argmax ``P_ST``,
   accumulated as sums and counts, all-reduced), the class prior (histogram of argmax ``P_ST``) and, with
   ``--pseudo_labels offline``, the stored ``P_ST`` maps (float16).
3. ``cpsl`` (steps ``[warmup_steps, warmup_steps + cpsl_steps)``): student + EMA teacher, weak/strong views,
   rectified labels and ``L_SL`` from :class:`cpsl_hf.selflabel.SelfLabeling`,
   ``L = L_src + L_tgt + lambda_sl L_SL + lambda_reg L_REG``. With ``--method mean_teacher`` the same stage
   without self-labeling (the built-in baseline): labels argmax ``P_ST``, no ``L_SL``.
4. ``distill1`` .. ``distillR`` (optional, ``--distill_rounds R`` rounds of ``--distill_steps`` each; SPEC.md
   stage 3, the reference's stages 2 and 3): the previous model (the CPSL export choice for round 1, the
   previous round's student after that) is frozen and gives hard pseudo labels on the target weak view
   (softmax averaged over the image and its mirror image, confidence > ``--distill_threshold``); a fresh
   student (``--distill_init``) learns ``L = L_src + CE(strong view, hard labels) + lambda_distill_kl
   KL(P_prev || P_student)``. Each round restarts the learning-rate schedule and the optimiser state.

Nothing in the per-step path moves a value to the host: losses and diagnostics are summed on the device and
read every ``--logging_steps``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cpsl_hf.data import protocols
from cpsl_hf.data.transforms import (
    GEOMETRIC_OPS,
    RANDAUGMENT_OPS,
    class_mix,
    cut_mix,
    normalize,
    strong_augment,
    to_float,
    warp_to_view,
    weak_augment,
)
from cpsl_hf.selflabel import (
    PrototypeAccumulator,
    SelfLabeling,
    class_histogram,
    cosine_logits,
    masked_cross_entropy,
    one_way_kl,
    symmetric_kl,
)
from cpsl_hf.selflabel.losses import symmetric_ce_loss

from .adversarial import OutputDiscriminator, discriminator_loss, generator_loss
from .arguments import RunArguments, UDATrainingArguments, dataset_kind, validate_against_datasets
from .checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
from .diagnostics import PseudoLabelMonitor, PseudoLabelRecord
from .ema import EMATeacher

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
LOSS_NAMES = ("loss", "loss_source", "loss_target", "loss_sl", "loss_reg")
DIAGNOSTIC_NAMES = ("changed_share", "sl_agreement", "top2_margin", "prior_entropy", "bank_fill")
DISTILL_PREFIX = "distill"
_METHOD_TITLES = {"cpsl": "CPSL", "mean_teacher": "mean-teacher"}
PHOTOMETRIC_OPS = tuple(name for name in RANDAUGMENT_OPS if name not in GEOMETRIC_OPS)


# ----------------------------------------------------------------------------------------------------------
# Datasets and model
# ----------------------------------------------------------------------------------------------------------
def load_domain_dataset(args: RunArguments, domain: str, split: str):
    """The ``datasets.Dataset`` of ``--source`` (domain "source") or ``--target`` (domain "target").

    ``split`` is "train" or the target's validation split name. Built-in names use their reader; anything
    else is a prepared folder or Hub repo read by ``load_prepared``.
    """
    from cpsl_hf import data as cpsl_data

    data = args.data
    name = getattr(data, domain)
    directory = getattr(data, f"{domain}_dir")
    kind = dataset_kind(name)
    if kind == "synthetic":
        is_val = split != "train"
        return cpsl_data.load_synthetic(
            domain=domain,
            split="validation" if is_val else "train",
            num_images=data.synthetic_val_images if is_val else data.synthetic_train_images,
            image_size=tuple(data.synthetic_image_size),
            seed=data.synthetic_seed,
            cache_dir=data.synthetic_cache_dir,
            variant=data.synthetic_variant,
        )
    if kind == "gta5":
        return cpsl_data.load_gta5(directory, num_classes=data.num_classes, streaming=data.streaming)
    if kind == "synthia":
        return cpsl_data.load_synthia(directory, num_classes=data.num_classes, streaming=data.streaming)
    if kind == "cityscapes":
        return cpsl_data.load_cityscapes(
            directory, split=split, num_classes=data.num_classes, streaming=data.streaming
        )
    return cpsl_data.load_prepared(name, split=split, streaming=data.streaming)


def _peek_dataset(dataset, count: int = 4) -> tuple[tuple[int, int], int | None]:
    """(H, W) of the first image and the largest non-ignored label id among the first ``count`` samples."""
    import numpy as np

    iterator = iter(dataset)
    size, max_label = None, None
    for _ in range(count):
        try:
            sample = next(iterator)
        except StopIteration:
            break
        if size is None:
            width, height = sample["image"].size
            size = (height, width)
        labels = np.asarray(sample["label"])
        labelled = labels[labels != IGNORE_INDEX]
        if labelled.size:
            max_label = max(int(labelled.max()), -1 if max_label is None else max_label)
    if size is None:
        raise ValueError("dataset is empty")
    return size, max_label


def build_model(args: RunArguments) -> nn.Module:
    """The student: a full CPSL checkpoint, a preset with random weights, or a pretrained encoder."""
    from cpsl_hf.configuration_cpsl import PRESETS, CPSLConfig
    from cpsl_hf.modeling_cpsl import CPSLForSemanticSegmentation

    num_classes = args.data.num_classes
    id2label = dict(enumerate(protocols.class_names(num_classes)))
    overrides: dict[str, Any] = {"sl_temperature": args.model.sl_temperature}
    if args.model.embedding_dim is not None:
        overrides["embedding_dim"] = args.model.embedding_dim
    if args.model.segformer_embedding is not None:
        overrides["segformer_embedding"] = args.model.segformer_embedding
    if args.model.model_name_or_path is not None:
        loaded_overrides = (
            {"segformer_embedding": args.model.segformer_embedding}
            if args.model.segformer_embedding is not None
            else {}
        )
        model = CPSLForSemanticSegmentation.from_pretrained(args.model.model_name_or_path, **loaded_overrides)
        if model.config.num_labels != num_classes:
            raise ValueError(
                f"--model_name_or_path {args.model.model_name_or_path}: the checkpoint has "
                f"{model.config.num_labels} classes, --num_classes is {num_classes}"
            )
        return model
    if args.model.backbone in PRESETS:
        config = CPSLConfig.from_preset(
            args.model.backbone, num_labels=num_classes, id2label=id2label, **overrides
        )
        return CPSLForSemanticSegmentation(config)
    return CPSLForSemanticSegmentation.from_pretrained_backbone(
        args.model.backbone, num_labels=num_classes, id2label=id2label, **overrides
    )


def training_stages(training: UDATrainingArguments) -> list[tuple[str, int]]:
    """The stages of a run in order, as ``(name, steps)``: ``warmup``, ``cpsl``, then ``distill1`` ..
    ``distillR`` for ``--distill_rounds R`` (stages of 0 steps included: they are skipped when run)."""
    rounds = [
        (f"{DISTILL_PREFIX}{index}", training.distill_steps)
        for index in range(1, training.distill_rounds + 1)
    ]
    return [("warmup", training.warmup_steps), ("cpsl", training.cpsl_steps), *rounds]


def distill_round_of(stage: str) -> int:
    """``distill3`` -> 3; any other stage name -> 0."""
    return int(stage[len(DISTILL_PREFIX) :]) if stage.startswith(DISTILL_PREFIX) else 0


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


def flip_averaged_probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax of ``model`` averaged over the images and their horizontal mirror images (mirrored back).

    Args:
        model: returns an output with ``.logits`` N x C x h x w (callers run it under ``torch.no_grad()``).
        images: N x 3 x H x W model input (normalised). Both orientations go through one forward pass.

    Returns:
        N x C x h x w float32 probabilities at the model's output resolution.
    """
    count = images.shape[0]
    probabilities = model(torch.cat([images, images.flip(-1)])).logits.float().softmax(dim=1)
    return (probabilities[:count] + probabilities[count:].flip(-1)) / 2


def hard_pseudo_labels(
    probabilities: torch.Tensor, threshold: float, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Argmax labels of N x C x h x w ``probabilities``; 255 where the maximum is <= ``threshold`` (the
    reference's ``lp[conf <= threshold] = 250``) or where ``valid_mask`` (N x h x w bool) is False.

    Returns:
        N x h x w int64 labels.
    """
    confidence, labels = probabilities.max(dim=1)
    keep = confidence > threshold
    if valid_mask is not None:
        keep = keep & valid_mask
    return torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))


class OfflinePseudoLabels:
    """``P_ST`` of the frozen warm-up model over the target training set, computed once and kept in memory.

    Probabilities are stored as float16 at decode resolution: 2 C bytes per decode pixel, i.e. for 19 classes
    311 KB per image for DeepLab-V2 (stride 8) on Cityscapes at 1024 x 512 (0.93 GB for its 2,975 training
    images) and 1.2 MB per image for SegFormer (stride 4; 3.7 GB), the same again in every checkpoint.
    float16 keeps every probability above 6e-8 (relative error 5e-4): a class the warm-up scored low still
    takes part in the rectification product ``P_SL * P_ST`` (uint8 quantisation zeroed everything below 0.002).
    :meth:`lookup` renormalises and maps them onto a weak view with the view's recorded geometry.

    Attributes:
        index: image name -> row of ``probabilities``.
        probabilities: K x C x h x w float16 (CPU).
    """

    def __init__(self, names: list[str], probabilities: torch.Tensor):
        if len(set(names)) != len(names):
            raise ValueError("offline pseudo labels: target image names must be unique")
        self.index = {name: row for row, name in enumerate(names)}
        self.probabilities = probabilities

    @staticmethod
    def compress(probs: torch.Tensor) -> torch.Tensor:
        """N x C x h x w float probabilities -> float16 (the stored form)."""
        return probs.to(torch.float16)

    def lookup(
        self, names: list[str], params, output_size: tuple[int, int], device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``P_ST`` of the named images on their weak views: (N x C x h x w float32, N x h x w valid mask)."""
        try:
            rows = torch.tensor([self.index[name] for name in names])
        except KeyError as error:
            raise KeyError(f"offline pseudo labels: no stored P_ST for target image {error}") from None
        stored = self.probabilities.index_select(0, rows).to(device, non_blocking=True).float()
        stored = stored / stored.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return warp_to_view(stored, params, output_size, mode="bilinear")

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.index), "probabilities": self.probabilities}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> OfflinePseudoLabels:
        return cls(state["names"], state["probabilities"])


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------
class UDATrainer:
    """Runs one adaptation: ``UDATrainer(args).train()`` (see the module docstring for the stages).

    Args:
        args: the parsed :class:`RunArguments` (``parse_args`` validates them).
    """

    def __init__(self, args: RunArguments):
        self.args = args
        self.history: dict[str, dict[str, dict[str, Any]]] = {}
        self.step = 0
        self.cpsl_initialized = False
        self.self_labeling: SelfLabeling | None = None
        self.offline_labels: OfflinePseudoLabels | None = None
        self.distill_round = 0  # the distillation round whose student is being trained (0: none yet)
        self.previous_model: nn.Module | None = None  # frozen network that labels the current round's targets
        self.initial_weights: dict[str, torch.Tensor] | None = None  # --distill_init pretrained
        self.discriminator: nn.Module | None = None  # --warmup_adversarial (prepared: DDP-wrapped if several)
        # W's own optimiser when it differs from the network's (--prototype_optimizer).
        self.prototype_optimizer = None
        self.pseudo_label_model: nn.Module | None = None  # --pseudo_labels frozen: the frozen warm-up model
        self.pseudo_label_monitor: PseudoLabelMonitor | None = None  # --pseudo_label_diagnostics
        self.pseudo_label_history: dict[str, dict[str, Any]] = {}  # stage -> stage_summary of the monitor
        self.output_dir = Path(args.training.output_dir)
        self.started = time.time()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Accelerator, datasets, loaders, model, teacher, optimizer, scheduler; then ``prepare``."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        args, training = self.args, self.args.training
        if training.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=training.mixed_precision,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            log_with=None if training.report_to == "none" else training.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            step_scheduler_with_optimizer=False,
        )
        accelerator = self.accelerator
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        if not accelerator.is_main_process:
            logging.getLogger("cpsl_hf").setLevel(logging.WARNING)
        set_seed(training.seed)  # same on every process: identical initial weights
        self.device = accelerator.device
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)

        self._build_data()
        model = build_model(args)
        self.num_classes = args.data.num_classes
        self.class_names = protocols.class_names(self.num_classes)
        self.embedding_dim = model.config.embedding_dim
        if training.distill_rounds > 0 and training.distill_init == "pretrained":
            # The students of the distillation rounds restart from these (rebuilt identically on resume: same
            # seed, and loading the data draws nothing from the global generator).
            self.initial_weights = {
                name: value.detach().clone() for name, value in model.state_dict().items()
            }

        groups = model.parameter_groups()
        lr = training.learning_rate
        head_lr = lr * training.head_lr_multiplier
        param_groups = [
            {
                "params": groups["backbone"],
                "lr": lr,
                "weight_decay": training.weight_decay,
                "name": "backbone",
            },
            {"params": groups["head"], "lr": head_lr, "weight_decay": training.weight_decay, "name": "head"},
        ]
        # The prototypes are L2-normalised wherever they are used: weight decay would only shrink them. Their
        # only gradient is lambda_sl L_SL; under Adam the update would not depend on lambda_sl, so by default they
        # get SGD (the reference's) in an optimiser of their own when the network trains with AdamW.
        prototype_group = {
            "params": groups["prototypes"],
            "lr": args.cpsl.prototype_lr if args.cpsl.prototype_lr is not None else head_lr,
            "weight_decay": 0.0,
            "name": "prototypes",
        }
        separate_prototypes = args.cpsl.prototype_optimizer != training.optimizer
        if not separate_prototypes:
            param_groups.append(prototype_group)
        optimizer = self._make_optimizer(training.optimizer, param_groups)
        schedule = dict(
            warmup_steps=training.warmup_steps,
            cpsl_steps=training.cpsl_steps,
            lr_warmup_steps=training.lr_warmup_steps,
            power=training.poly_power,
            cpsl_lr_scale=training.cpsl_lr_scale,
            distill_steps=training.distill_steps,
            distill_rounds=training.distill_rounds,
            distill_lr_scale=training.distill_lr_scale,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: stage_lr_factor(step, **schedule)
        )

        # W is trained by L_SL outside the student's forward (on teacher embeddings), which DDP's reducer cannot
        # track; it is left out of DDP and its gradient all-reduced by hand (see _sync_prototype_gradient).
        prototype_names = [n for n, p in model.named_parameters() if p is model.self_labeling_head.prototypes]
        if accelerator.num_processes > 1:
            from torch.nn.parallel import DistributedDataParallel

            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, prototype_names)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        if separate_prototypes:
            prototype_optimizer = self._make_optimizer(args.cpsl.prototype_optimizer, [prototype_group])
            prototype_scheduler = torch.optim.lr_scheduler.LambdaLR(
                prototype_optimizer, lambda step: stage_lr_factor(step, **schedule)
            )
            self.prototype_optimizer, self.prototype_scheduler = accelerator.prepare(
                prototype_optimizer, prototype_scheduler
            )
        if args.cpsl.pseudo_label_diagnostics:
            self.pseudo_label_monitor = PseudoLabelMonitor(self.num_classes, self.device)
        if training.warmup_adversarial:
            # Built after the student, so the student's initial weights do not depend on the option. Prepared:
            # DDP all-reduces its gradients, and save_state/load_state carry its weights, Adam and schedule.
            discriminator = OutputDiscriminator(self.num_classes)
            discriminator_optimizer = torch.optim.Adam(
                discriminator.parameters(), lr=training.discriminator_lr, betas=(0.9, 0.99)
            )
            discriminator_scheduler = torch.optim.lr_scheduler.LambdaLR(
                discriminator_optimizer, lambda step: stage_lr_factor(step, **schedule)
            )
            self.discriminator, self.discriminator_optimizer, self.discriminator_scheduler = (
                accelerator.prepare(discriminator, discriminator_optimizer, discriminator_scheduler)
            )
        self.teacher = EMATeacher(self.unwrapped, momentum=args.cpsl.ema_momentum, ramp=args.cpsl.ema_ramp)
        self.teacher.to(self.device)

        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(training.seed * 1000 + 17 + accelerator.process_index)
        if training.report_to != "none":
            accelerator.init_trackers("cpsl", config=_flat_config(args))

    def _make_optimizer(self, kind: str, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """``torch.optim.SGD`` (momentum ``--sgd_momentum``) or ``AdamW`` (``--adam_betas``) over the groups."""
        training = self.args.training
        if kind == "sgd":
            return torch.optim.SGD(param_groups, lr=training.learning_rate, momentum=training.sgd_momentum)
        return torch.optim.AdamW(param_groups, lr=training.learning_rate, betas=tuple(training.adam_betas))

    def _optimizers(self) -> list:
        """The prepared optimisers of the student: the network's, and W's own when it has one."""
        return [self.optimizer] + ([self.prototype_optimizer] if self.prototype_optimizer is not None else [])

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _build_data(self) -> None:
        from cpsl_hf.data.loading import build_eval_loader, build_train_loader

        args, accelerator = self.args, self.accelerator
        data, training = args.data, args.training
        with accelerator.main_process_first():
            self.source_train = load_domain_dataset(args, "source", "train")
            self.target_train = load_domain_dataset(args, "target", data.target_train_split)
            self.target_val = load_domain_dataset(args, "target", data.target_val_split)
        if data.max_eval_images is not None and hasattr(self.target_val, "select"):
            self.target_val = self.target_val.select(range(min(data.max_eval_images, len(self.target_val))))
        source_size, source_max = _peek_dataset(self.source_train)
        target_size, target_max = _peek_dataset(self.target_train)
        _, val_max = _peek_dataset(self.target_val)
        validate_against_datasets(
            args,
            tuple(data.source_resize) if data.source_resize else source_size,
            tuple(data.target_resize) if data.target_resize else target_size,
            source_max,
            val_max if val_max is not None else target_max,
        )
        common = dict(
            num_workers=data.num_workers,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
        )
        self.source_loader = build_train_loader(
            self.source_train,
            training.source_batch_size,
            image_size=tuple(data.source_resize) if data.source_resize else None,
            seed=training.seed,
            **common,
        )
        self.target_loader = build_train_loader(
            self.target_train,
            training.target_batch_size,
            image_size=tuple(data.target_resize) if data.target_resize else None,
            seed=training.seed + 1,
            **common,
        )
        self._eval_loader_args = dict(
            batch_size=training.eval_batch_size,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
        )
        self._build_eval_loader = build_eval_loader

    def eval_loader(self):
        """A fresh one-pass loader over the target validation split (this process's shard)."""
        resize = self.args.data.eval_resize
        return self._build_eval_loader(
            self.target_val, image_size=tuple(resize) if resize else None, **self._eval_loader_args
        )

    # ------------------------------------------------------------------ batches and views
    def _next_batch(self, loader) -> dict[str, Any]:
        # A DataLoader draws its base seed from the global RNG whenever it starts an epoch (or restarts after a
        # resume); forking keeps that draw out of the training stream (dropout), so resumes are bit-exact.
        with torch.random.fork_rng(devices=[]):
            batch = next(loader)
        return {
            "pixel_values": batch["pixel_values"].to(self.device, non_blocking=True),
            "labels": batch["labels"].to(self.device, non_blocking=True),
            "name": batch["name"],
        }

    def _source_view(self, batch):
        """Source crop (WeakView: images N x 3 x h x w float, labels N x h x w); with ``--source_augment
        photometric`` the images also get the strong view's colour operations (geometry unchanged)."""
        data = self.args.data
        view = weak_augment(
            to_float(batch["pixel_values"]),
            batch["labels"],
            crop_size=tuple(data.crop_size),
            scale_range=tuple(data.scale_range),
            generator=self.generator,
        )
        if data.source_augment == "photometric":
            view.images = strong_augment(
                view.images, generator=self.generator, randaugment_ops=PHOTOMETRIC_OPS, cutout=False
            ).images
        return view

    def target_weak_view(self, batch):
        """Target weak view (rescale, crop, flip; no labels) with its recorded geometry (``WeakView``; images
        N x 3 x h x w float in [0, 1])."""
        data = self.args.data
        return weak_augment(
            to_float(batch["pixel_values"]),
            None,
            crop_size=tuple(data.crop_size),
            scale_range=tuple(data.scale_range),
            generator=self.generator,
        )

    def target_views(self, batch):
        """Target weak view (:meth:`target_weak_view`) and the strong view of that weak crop, each with its
        recorded geometry (``WeakView``, ``StrongView``; images N x 3 x h x w float in [0, 1])."""
        weak = self.target_weak_view(batch)
        return weak, strong_augment(weak.images, generator=self.generator)

    # ------------------------------------------------------------------ losses
    def source_losses(self, source_batch) -> dict[str, torch.Tensor]:
        """Warm-up step: ``L_src = CE(student(source crop), labels)`` at label resolution."""
        view = self._source_view(source_batch)
        with self.accelerator.autocast():
            logits = self.model(normalize(view.images)).logits
        loss = _cross_entropy_at(logits, view.labels)
        return {"loss": loss, "loss_source": loss.detach()}

    def adversarial_warmup_losses(self, source_batch, target_batch) -> dict[str, torch.Tensor]:
        """Warm-up step with ``--warmup_adversarial`` (AdaptSegNet; the reference's ``step_adv``).

        One student forward on the source crop and the target weak view (no labels); logits upsampled
        (bilinear) to the crop size, as the reference does, then softmax ``P`` (N x C x h x w, float32).

        Returns:
            ``loss`` = ``L_src + lambda_adv L_adv`` (the student's; ``D``'s parameters frozen in ``L_adv``),
            ``loss_discriminator`` = ``L_D`` on the detached ``P`` (with its graph to ``D`` only: the loop
            back-propagates it after the student's step), and detached ``loss_source`` and ``loss_adv``.
        """
        training = self.args.training
        source = self._source_view(source_batch)
        data = self.args.data
        target = self.target_weak_view(target_batch)
        num_source = source.images.shape[0]
        with self.accelerator.autocast():
            logits = self.model(normalize(torch.cat([source.images, target.images]))).logits
        logits = F.interpolate(
            logits.float(), size=tuple(data.crop_size), mode="bilinear", align_corners=False
        )
        probabilities = logits.softmax(dim=1)
        loss_source = masked_cross_entropy(logits[:num_source], source.labels, IGNORE_INDEX)
        plain_discriminator = self.accelerator.unwrap_model(self.discriminator)
        with self.accelerator.autocast():
            loss_adv = generator_loss(
                plain_discriminator, probabilities[num_source:], training.adversarial_loss
            )
            loss_d = discriminator_loss(
                self.discriminator,
                probabilities[:num_source],
                probabilities[num_source:],
                training.adversarial_loss,
            )
        return {
            "loss": loss_source + training.lambda_adv * loss_adv,
            "loss_discriminator": loss_d,
            "loss_source": loss_source.detach(),
            "loss_adv": loss_adv.detach(),
        }

    def discriminator_step(self, loss: torch.Tensor) -> None:
        """Back-propagate ``L_D`` (reaches ``D`` only) and step ``D``'s Adam (skipped while accumulating)."""
        self.accelerator.backward(loss)
        self.discriminator_optimizer.step()
        self.discriminator_optimizer.zero_grad(set_to_none=True)

    def _labels_on_strong_view(self, labels_weak: torch.Tensor, strong, decode_size) -> torch.Tensor:
        """N x h x w weak-view labels warped onto the strong view (nearest; 255 outside it) and, with
        ``--cutout_labels ignore``, 255 inside the cutout box, whose pixels the student does not see."""
        labels, _ = warp_to_view(labels_weak, strong.params, decode_size, mode="nearest", fill=IGNORE_INDEX)
        if self.args.cpsl.cutout_labels == "ignore":
            labels = labels.masked_fill(_resize_mask(strong.cutout_mask, decode_size), IGNORE_INDEX)
        return labels

    def pseudo_label_probabilities(
        self, weak, names: list[str], teacher_logits: torch.Tensor, weak_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``P_ST`` on the target weak view from ``--pseudo_labels`` and the pixels where it is defined.

        Args:
            weak: the target ``WeakView`` (images N x 3 x H x W in [0, 1], recorded geometry).
            names: the N target image names (``offline`` looks them up).
            teacher_logits: N x C x h x w float32 EMA-teacher logits on the weak view (``teacher``).
            weak_valid: N x h x w bool, the view's pixels inside the image.

        Returns:
            ``(P_ST N x C x h x w float32, valid N x h x w bool)``.
        """
        source = self.args.cpsl.pseudo_labels
        if source == "teacher":
            return teacher_logits.softmax(dim=1), weak_valid
        if source == "frozen":
            with torch.no_grad(), self.accelerator.autocast():
                logits = self.pseudo_label_model(normalize(weak.images)).logits
            return logits.float().softmax(dim=1), weak_valid
        p_st, stored_valid = self.offline_labels.lookup(
            names, weak.params, tuple(teacher_logits.shape[-2:]), self.device
        )
        return p_st, weak_valid & stored_valid

    def cpsl_losses(self, source_batch, target_batch) -> tuple[dict[str, torch.Tensor], PseudoLabelRecord]:
        """One step of the adaptation stage (SPEC.md): ``L = L_src + L_tgt + lambda_sl L_SL + lambda_reg L_REG``.

        Source crop (weak view with labels). Target weak view -> EMA teacher (embeddings ``z'``, logits) and
        ``P_ST`` (:meth:`pseudo_label_probabilities`). ``--method cpsl``: ``z'``, ``P_ST`` -> :class:`SelfLabeling`
        -> rectified labels ``argmax P_SL P_ST`` and ``L_SL``; ``--method mean_teacher``: labels ``argmax P_ST``
        (confidence above ``--pseudo_label_threshold``), no ``L_SL``. Target strong view (of the weak crop) ->
        student. The labels and the teacher's maps are warped onto the strong view with its recorded geometry.
        ``L_tgt`` (CE, or CE + RCE) is computed at ``--pseudo_label_resolution`` (the crop's: ``P_ST`` and
        ``P_SL`` upsampled before the argmax, the student's logits upsampled; or the decoder's), without the
        cutout box unless ``--cutout_labels keep``. ``L_REG`` (``--consistency``), at the decoder's resolution:
        ``reference``, KL(P_w || P_s) of the self-labeling head with the EMA prototypes ``W'`` on both sides
        (``W'`` is never trained, so the loss reaches the student's features only); ``symmetric``, both KL
        directions of the segmentation softmax; over pixels valid in both views and outside the cutout box.

        Returns:
            the losses (``loss`` with its graph, the rest detached) and the step's :class:`PseudoLabelRecord`
            (for :class:`PseudoLabelMonitor`; the target's ground truth never enters this method).
        """
        cpsl = self.args.cpsl
        self_labeling = cpsl.method == "cpsl"
        source = self._source_view(source_batch)
        weak, strong = self.target_views(target_batch)

        # Teacher on the weak view: embeddings z' and logits (decode resolution h x w); P_ST.
        with torch.no_grad(), self.accelerator.autocast(), self.teacher.mode(cpsl.teacher_mode == "train"):
            teacher_embeddings, teacher_logits = self.teacher.module.encode(normalize(weak.images))
        teacher_logits = teacher_logits.float()
        decode_size = tuple(teacher_logits.shape[-2:])
        weak_valid = _resize_mask(weak.valid_mask, decode_size)
        p_st, weak_valid = self.pseudo_label_probabilities(
            weak, target_batch["name"], teacher_logits, weak_valid
        )

        # Student: source crop, target strong view (and the weak view when L_SL may reach its embeddings).
        student_inputs = [source.images, strong.images]
        if cpsl.sl_grad_to_student_embeddings:
            student_inputs.append(weak.images)
        num_source, num_target = source.images.shape[0], strong.images.shape[0]

        # Optional: paste source pixels into the strong target view (ClassMix / CutMix).
        mix_mask = None
        if cpsl.mix != "none":
            # The target labels of the mixed image are only known after the pseudo labels below, so the mask is
            # drawn here (from the source labels) and applied to images now, to labels afterwards.
            mixer = class_mix if cpsl.mix == "classmix" else cut_mix
            mixed = mixer(
                source.images,
                source.labels,
                strong.images,
                torch.full_like(source.labels, IGNORE_INDEX),
                generator=self.generator,
                p=cpsl.mix_prob,
            )
            student_inputs[1] = mixed.images
            mix_mask = mixed.mask

        with self.accelerator.autocast():
            student_out = self.model(
                normalize(torch.cat(student_inputs)),
                output_embeddings=cpsl.consistency == "reference" or cpsl.sl_grad_to_student_embeddings,
            )
        logits = student_out.logits
        source_logits = logits[:num_source]
        target_logits = logits[num_source : num_source + num_target]

        # Pseudo labels on the weak view: rectified by self-labeling (and L_SL), or argmax P_ST.
        losses: dict[str, torch.Tensor] = {}
        teacher_prototypes = self.teacher.module.self_labeling_head.prototypes
        if self_labeling:
            student_embeddings = None
            if cpsl.sl_grad_to_student_embeddings:
                student_embeddings = student_out.embeddings[num_source + num_target :]
            result = self.self_labeling(
                teacher_embeddings=teacher_embeddings,
                p_st=p_st,
                teacher_prototypes=teacher_prototypes,
                student_prototypes=self.unwrapped.self_labeling_head.prototypes,
                student_embeddings=student_embeddings,
                teacher_logits=teacher_logits if cpsl.sl_logits_branch else None,
                valid_mask=weak_valid,
                generator=self.generator,
            )
            losses["loss_sl"] = result.loss
            losses.update({name: result.diagnostics[name].detach() for name in DIAGNOSTIC_NAMES})

        # The labels the target loss trains on, at --pseudo_label_resolution: the decoder's (the reference) or
        # the crop's, from P_ST (and P_SL) upsampled bilinearly, where thin structures keep their pixels.
        label_size = (
            decode_size if cpsl.pseudo_label_resolution == "decode" else tuple(weak.images.shape[-2:])
        )
        label_valid = _resize_mask(weak_valid, label_size)
        if label_size != decode_size:
            label_valid = label_valid & weak.valid_mask
        p_st_resized = _upsampled(p_st, label_size)
        if self_labeling:
            p_sl_resized = _upsampled(result.sl_probs, label_size)
            labels_weak = (
                result.labels
                if label_size == decode_size
                else self.self_labeling.pseudo_labels(p_sl_resized, p_st_resized, label_valid)
            )
        else:
            labels_weak = hard_pseudo_labels(p_st_resized, cpsl.pseudo_label_threshold, label_valid)
        outside = torch.full_like(labels_weak, IGNORE_INDEX)
        record = PseudoLabelRecord(
            params=weak.params,
            p_st_labels=torch.where(label_valid, p_st_resized.argmax(dim=1), outside),
            pseudo_labels=labels_weak,
            valid=label_valid,
            p_sl_labels=torch.where(label_valid, p_sl_resized.argmax(dim=1), outside)
            if self_labeling
            else None,
        )

        # Weak-view quantities onto the strong view: labels at their size, the consistency's maps at the decoder's.
        labels_strong = self._labels_on_strong_view(labels_weak, strong, label_size)
        strong_valid = _resize_mask(strong.valid_mask, decode_size) & ~_resize_mask(
            strong.cutout_mask, decode_size
        )
        if mix_mask is not None:
            labels_strong = torch.where(
                _resize_mask(mix_mask, label_size),
                _downsample_labels(source.labels, label_size),
                labels_strong,
            )
            strong_valid = strong_valid & ~_resize_mask(mix_mask, decode_size)

        loss_source = _cross_entropy_at(source_logits, source.labels)
        target_logits_at_labels = _upsampled(target_logits, label_size)
        if cpsl.target_loss == "ce":
            loss_target = masked_cross_entropy(target_logits_at_labels, labels_strong, IGNORE_INDEX)
        else:
            loss_target = symmetric_ce_loss(
                target_logits_at_labels.float(), labels_strong, ignore_index=IGNORE_INDEX
            )
        loss = loss_source + loss_target
        if self_labeling:
            loss = loss + cpsl.lambda_sl * losses["loss_sl"]
        if cpsl.consistency != "none":
            if cpsl.consistency == "reference":
                # cos(z, W') / tau on both sides: the teacher's on the weak view (the core's P_SL logits), the
                # student's on the strong view; W' is the EMA of W and no optimiser's parameter.
                reference_w = result.sl_logits
                student_embeddings_strong = student_out.embeddings[num_source : num_source + num_target]
                reference_s = cosine_logits(
                    student_embeddings_strong, teacher_prototypes.detach(), self.self_labeling.temperature
                )
            else:
                reference_w, reference_s = teacher_logits, target_logits
            # One warp for the teacher's map and the weak view's validity (an extra channel, > 0.5 = valid).
            warped, warped_valid = warp_to_view(
                torch.cat([reference_w, weak_valid[:, None].to(reference_w.dtype)], dim=1),
                strong.params,
                decode_size,
                mode="bilinear",
            )
            consistency_valid = warped_valid & strong_valid & (warped[:, -1] > 0.5)
            kl = one_way_kl if cpsl.consistency == "reference" else symmetric_kl
            loss_reg = kl(warped[:, :-1], reference_s, consistency_valid)
            loss = loss + cpsl.lambda_reg * loss_reg
            losses["loss_reg"] = loss_reg
        losses = {name: value.detach() for name, value in losses.items()}
        losses.update(loss=loss, loss_source=loss_source.detach(), loss_target=loss_target.detach())
        return losses, record

    def distill_losses(self, source_batch, target_batch) -> dict[str, torch.Tensor]:
        """One distillation step (SPEC.md stage 3): ``L = L_src + L_tgt + lambda_distill_kl L_KL``.

        The frozen previous model labels the target weak view: its softmax averaged over the view and its
        mirror image gives ``P_prev`` (N x C x h x w, decode resolution) and the hard labels (argmax, 255 where
        the confidence is <= ``--distill_threshold`` or outside the image). The student sees the strong view;
        ``L_tgt`` is the cross-entropy to the hard labels warped onto it, ``L_KL = KL(P_prev || P_student)``
        over the pixels valid in both views. ``source_batch`` None (``--no_distill_source_loss``) drops
        ``L_src``.
        """
        training = self.args.training
        source = None if source_batch is None else self._source_view(source_batch)
        weak, strong = self.target_views(target_batch)

        with torch.no_grad(), self.accelerator.autocast():
            previous_probs = flip_averaged_probabilities(self.previous_model, normalize(weak.images))
        decode_size = tuple(previous_probs.shape[-2:])
        weak_valid = _resize_mask(weak.valid_mask, decode_size)
        labels_weak = hard_pseudo_labels(previous_probs, training.distill_threshold, weak_valid)

        student_inputs = [strong.images] if source is None else [source.images, strong.images]
        with self.accelerator.autocast():
            logits = self.model(normalize(torch.cat(student_inputs))).logits
        num_target = strong.images.shape[0]
        target_logits = logits[logits.shape[0] - num_target :]

        # Weak-view labels and P_prev onto the strong view (P_prev and the weak view's validity in one warp).
        labels_strong = self._labels_on_strong_view(labels_weak, strong, decode_size)
        warped, warped_valid = warp_to_view(
            torch.cat([previous_probs, weak_valid[:, None].float()], dim=1),
            strong.params,
            decode_size,
            mode="bilinear",
        )
        kl_valid = warped_valid & _resize_mask(strong.valid_mask, decode_size) & (warped[:, -1] > 0.5)
        # log P_prev as logits: one_way_kl's log-softmax of it is log P_prev again (the clamp only keeps
        # log 0 finite).
        previous_log_probs = warped[:, :-1].clamp_min(torch.finfo(torch.float32).tiny).log()

        loss_target = masked_cross_entropy(target_logits, labels_strong, IGNORE_INDEX)
        loss_kl = one_way_kl(previous_log_probs, target_logits, kl_valid)
        loss = loss_target + training.lambda_distill_kl * loss_kl
        losses = {"loss_target": loss_target.detach(), "loss_kl": loss_kl.detach()}
        if source is not None:
            loss_source = _cross_entropy_at(logits[: source.images.shape[0]], source.labels)
            loss = loss + loss_source
            losses["loss_source"] = loss_source.detach()
        labelled = (labels_weak != IGNORE_INDEX).float().sum()
        losses["pseudo_label_share"] = labelled / weak_valid.float().sum().clamp_min(1.0)
        return {"loss": loss, **losses}

    # ------------------------------------------------------------------ the init stage
    def build_self_labeling(self) -> SelfLabeling:
        cpsl = self.args.cpsl
        return SelfLabeling(
            num_classes=self.num_classes,
            embedding_dim=self.embedding_dim,
            num_samples=cpsl.samples_per_image,
            bank_size=cpsl.bank_size,
            temperature=self.unwrapped.self_labeling_head.temperature,
            epsilon=cpsl.sinkhorn_epsilon,
            sinkhorn_iterations=cpsl.sinkhorn_iterations,
            prior_momentum=cpsl.prior_momentum,
            static_prior=cpsl.prior != "dynamic",
            sampling=cpsl.sampling,
            rectify_threshold=cpsl.rectify_threshold,
            rectification=cpsl.rectification,
            logits_branch=cpsl.sl_logits_branch,
        ).to(self.device)

    @torch.no_grad()
    def initialize_cpsl(self) -> None:
        """See :meth:`_initialize_cpsl`; the pass over the target set leaves the global RNG untouched."""
        with torch.random.fork_rng(devices=[]):
            self._initialize_cpsl()

    @torch.no_grad()
    def _initialize_cpsl(self) -> None:
        """Teacher <- warm-up student (and the frozen P_ST model, ``--pseudo_labels frozen``); for CPSL, W = W' =
        class means of teacher embeddings over the target training set (argmax ``P_ST``) and prior <- histogram
        of argmax ``P_ST``; offline ``P_ST`` stored when asked. The pass over the target set is skipped when
        nothing needs it (mean teacher without offline labels)."""
        cpsl = self.args.cpsl
        student = self.unwrapped
        self.teacher.reset(student)
        self_labeling = cpsl.method == "cpsl"
        if self_labeling or cpsl.pseudo_labels == "offline":
            self._target_pass(self_labeling)
        if cpsl.pseudo_labels == "frozen":
            # The whole warm-up model, prototypes included (only its logits serve).
            self.pseudo_label_model = _frozen_copy(student)
        # A fresh optimiser state for the new stage (the reference trains the stages as separate runs).
        for optimizer in self._optimizers():
            optimizer.optimizer.state.clear()
        self.cpsl_initialized = True

    def _target_pass(self, self_labeling: bool) -> None:
        """One pass of the teacher (= the warm-up model) over the target training set: prototypes and prior
        (``self_labeling``), and the stored ``P_ST`` maps (``--pseudo_labels offline``)."""
        accelerator, cpsl = self.accelerator, self.args.cpsl
        student = self.unwrapped
        dataset = self.target_train
        if cpsl.init_max_images is not None and hasattr(dataset, "select"):
            dataset = dataset.select(range(min(cpsl.init_max_images, len(dataset))))
        resize = self.args.data.target_resize
        loader = self._build_eval_loader(
            dataset, image_size=tuple(resize) if resize else None, **self._eval_loader_args
        )
        accumulator = PrototypeAccumulator(self.num_classes, self.embedding_dim).to(self.device)
        histogram = torch.zeros(self.num_classes, device=self.device)
        stored, names = [], []
        for batch in _progress(
            loader, accelerator.is_main_process and self.args.training.progress_bar, "init"
        ):
            images = batch["pixel_values"].to(self.device, non_blocking=True)
            with self.accelerator.autocast():
                out = self.teacher(normalize(to_float(images)), output_embeddings=self_labeling)
            probs = out.logits.float().softmax(dim=1)
            if self_labeling:
                accumulator.update(out.embeddings.float(), probs)
                histogram += class_histogram(probs.argmax(dim=1), self.num_classes)
            if cpsl.pseudo_labels == "offline":
                stored.append(OfflinePseudoLabels.compress(probs).cpu())
                names.extend(batch["name"])
        if self_labeling:
            accumulator.all_reduce()
            histogram = accelerator.reduce(histogram, reduction="sum")
            prototypes = accumulator.compute(normalize=True)
            unseen = accumulator.counts == 0
            # A class no target pixel was assigned to keeps its random (normalised) prototype.
            prototypes = torch.where(
                unseen[:, None], F.normalize(student.self_labeling_head.prototypes.float(), dim=1), prototypes
            )
            student.self_labeling_head.prototypes.copy_(prototypes)
            self.teacher.module.self_labeling_head.prototypes.copy_(prototypes)
            self.self_labeling = self.build_self_labeling()
            if cpsl.prior != "uniform":  # uniform: the built prior, 1/C, for ever
                self.self_labeling.initialize_prior(histogram + 1.0)  # +1: no class starts with zero mass
        if cpsl.pseudo_labels == "offline":
            self.offline_labels = self._gather_offline(stored, names)

    def _gather_offline(self, stored: list[torch.Tensor], names: list[str]) -> OfflinePseudoLabels:
        """Every process ends with the P_ST maps of the whole target set (each computed its shard)."""
        from accelerate.utils import gather_object

        if not stored:
            raise ValueError("--pseudo_labels offline: the target training set is empty")
        shapes = {tuple(t.shape[1:]) for t in stored}
        if len(shapes) != 1:
            raise ValueError(
                "--pseudo_labels offline needs target images of one size; set --target_resize H W"
            )
        local = torch.cat(stored)
        if self.accelerator.num_processes > 1:
            parts = gather_object([(names, local)])
            names = [name for part_names, _ in parts for name in part_names]
            local = torch.cat([tensor for _, tensor in parts])
        return OfflinePseudoLabels(names, local)

    # ------------------------------------------------------------------ distillation rounds
    @torch.no_grad()
    def start_distill_round(self, round_index: int) -> None:
        """Freeze the previous model and give the student its fresh start for round ``round_index`` (1-based).

        The previous model is, for round 1, the network the CPSL stage exports (``--export_model``: student or
        EMA teacher; the student when no CPSL stage ran), for later rounds the previous round's student. It is a
        plain module (no DDP wrapper), without gradients, in eval mode. The student (``self.model``, already
        prepared) is re-initialised in place: with the run's initial weights (``--distill_init pretrained``) or
        with the previous model's (``previous``); its optimiser state starts empty, as at the CPSL init.
        """
        training = self.args.training
        student = self.unwrapped
        if round_index == 1 and self.cpsl_initialized and training.export_model == "teacher":
            previous = self.teacher.module
        else:
            previous = student
        if self.previous_model is None:
            self.previous_model = _frozen_copy(previous)
        else:
            self.previous_model.load_state_dict(previous.state_dict())
        if training.distill_init == "pretrained":
            student.load_state_dict(self.initial_weights)
        else:
            student.load_state_dict(self.previous_model.state_dict())
        for optimizer in self._optimizers():
            optimizer.optimizer.state.clear()
        self.distill_round = round_index

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, stage: str) -> dict[str, dict[str, Any]]:
        """mIoU of the student (and the teacher in the CPSL stage) on the target validation split, recorded in
        ``history[stage][step]`` (stages ``warmup``, ``cpsl``, ``distill1``, ...)."""
        from cpsl_hf.evaluation import evaluate_model

        training = self.args.training
        networks = {"student": self.unwrapped}
        if stage == "cpsl" and self.cpsl_initialized and training.eval_teacher:
            networks["teacher"] = self.teacher.module
        results = {}
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(training.mixed_precision)
        for who, network in networks.items():
            with torch.random.fork_rng(devices=[]):  # evaluating never changes the training's random stream
                metrics = evaluate_model(
                    network,
                    self.eval_loader(),
                    self.num_classes,
                    device=self.device,
                    autocast_dtype=autocast,
                    progress=self.accelerator.is_main_process and training.progress_bar,
                )
            results[who] = _json_ready(metrics)
        if self.accelerator.is_main_process and training.save_predictions > 0:
            # A few image | ground truth | prediction strips per evaluation, to look at how adaptation goes.
            self._save_predictions(
                self.unwrapped, self.output_dir / "predictions" / f"{stage}-step{self.step:06d}"
            )
        self.unwrapped.train()
        self.history.setdefault(stage, {})[str(self.step)] = results
        if self.pseudo_label_monitor is not None and stage in self.pseudo_label_monitor.totals:
            summary = self.pseudo_label_monitor.stage_summary(stage, self.class_names)
            if summary is not None:
                self.pseudo_label_history[stage] = {"step": self.step, **summary}
        if self.accelerator.is_main_process:
            summary = ", ".join(f"{who} mIoU {100 * m['mean_iou']:.2f}" for who, m in results.items())
            logger.info("evaluation at step %d (%s): %s", self.step, stage, summary)
        self.accelerator.log(
            {f"eval/{who}_miou": m["mean_iou"] for who, m in results.items()}, step=self.step
        )
        return results

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        trainer_state = {
            "step": self.step,
            "stage": self.stage_at(self.step),
            "cpsl_initialized": self.cpsl_initialized,
            "teacher": self.teacher.state_dict(),
            "self_labeling": None if self.self_labeling is None else self.self_labeling.state_dict(),
            "offline_labels": None if self.offline_labels is None else self.offline_labels.state_dict(),
            "distill_round": self.distill_round,
            "previous_model": None if self.previous_model is None else self.previous_model.state_dict(),
            "pseudo_label_model": None
            if self.pseudo_label_model is None
            else self.pseudo_label_model.state_dict(),
            "pseudo_label_history": self.pseudo_label_history,
            "history": self.history,
            "arguments": self.args.to_dict(),
        }
        process_state = {
            "source_loader": self.source_loader.state_dict(),
            "target_loader": self.target_loader.state_dict(),
            "generator": self.generator.get_state(),
            "pseudo_label_monitor": None
            if self.pseudo_label_monitor is None
            else self.pseudo_label_monitor.state_dict(),
        }
        return save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.step,
            trainer_state,
            process_state,
            self.args.training.checkpoints_total_limit,
        )

    def restore(self, path: Path) -> None:
        trainer_state, process_state = load_checkpoint(self.accelerator, path)
        self.step = int(trainer_state["step"])
        self.cpsl_initialized = bool(trainer_state["cpsl_initialized"])
        self.teacher.load_state_dict(trainer_state["teacher"])
        if trainer_state["self_labeling"] is not None:
            self.self_labeling = self.build_self_labeling()
            self.self_labeling.load_state_dict(trainer_state["self_labeling"])
        if trainer_state["offline_labels"] is not None:
            self.offline_labels = OfflinePseudoLabels.from_state_dict(trainer_state["offline_labels"])
        self.distill_round = int(trainer_state.get("distill_round", 0))
        if trainer_state.get("previous_model") is not None:
            self.previous_model = _frozen_copy(self.unwrapped)
            self.previous_model.load_state_dict(trainer_state["previous_model"])
        if trainer_state.get("pseudo_label_model") is not None:
            self.pseudo_label_model = _frozen_copy(self.unwrapped)
            self.pseudo_label_model.load_state_dict(trainer_state["pseudo_label_model"])
        self.pseudo_label_history = trainer_state.get("pseudo_label_history", {})
        if self.pseudo_label_monitor is not None and process_state.get("pseudo_label_monitor") is not None:
            self.pseudo_label_monitor.load_state_dict(process_state["pseudo_label_monitor"])
        self.history = trainer_state["history"]
        self.source_loader.load_state_dict(process_state["source_loader"])
        self.target_loader.load_state_dict(process_state["target_loader"])
        self.generator.set_state(process_state["generator"])
        if self.accelerator.is_main_process:
            logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ the loop
    def stage_at(self, step: int) -> str:
        """Name of the stage that global ``step`` belongs to (the last stage for steps past the end)."""
        stages = training_stages(self.args.training)
        start = 0
        for name, length in stages:
            if step < start + length:
                return name
            start += length
        return stages[-1][0]

    def _evaluated(self, stage: str, step: int) -> bool:
        return str(step) in self.history.get(stage, {})

    def _sync_prototype_gradient(self) -> None:
        """All-reduce (mean) the gradient of W, which DDP does not manage (see ``setup``)."""
        if self.accelerator.num_processes == 1:
            return
        grad = self.unwrapped.self_labeling_head.prototypes.grad
        if grad is not None:
            torch.distributed.all_reduce(grad)
            grad.div_(self.accelerator.num_processes)

    def _sync_buffers(self) -> None:
        """Broadcast the student's buffers (BatchNorm statistics) from process 0, as DDP does before the next
        forward, so that the EMA teacher, evaluations and checkpoints are identical on every process."""
        if self.accelerator.num_processes == 1:
            return
        # Looked up every time: evaluation moves the model (``.to``), which may replace buffer tensors.
        handles = [torch.distributed.broadcast(b, src=0, async_op=True) for b in self.unwrapped.buffers()]
        for handle in handles:
            handle.wait()

    def train(self) -> dict[str, Any]:
        """Run (or resume) the whole pipeline; returns the metrics history (also written to metrics.json)."""
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        try:
            return self._train()
        finally:  # leave the process as it was (tests and notebooks run several trainings)
            torch.use_deterministic_algorithms(deterministic_before)

    def _train(self) -> dict[str, Any]:
        self.setup()
        training, accelerator = self.args.training, self.accelerator
        checkpoint = resolve_checkpoint(training.resume_from_checkpoint, self.output_dir)
        if checkpoint is not None:
            self.restore(checkpoint)
        stages = training_stages(training)
        stage_ends = set(itertools.accumulate(length for _, length in stages))
        total = max(stage_ends)
        stop = total if training.stop_at_step is None else min(training.stop_at_step, total)
        progress = _progress_bar(total, self.step, accelerator.is_main_process and training.progress_bar)
        running: dict[str, torch.Tensor] = {}
        window_start, window_steps, window_images = time.time(), 0, 0
        self.model.train()
        if self.step < training.warmup_steps and self.step == 0 and training.warmup_steps > 0:
            logger.info("stage warmup: %d source-only steps", training.warmup_steps)

        while self.step < stop:
            stage = self.stage_at(self.step)
            if stage == "cpsl" and not self.cpsl_initialized:
                if not self._evaluated("warmup", self.step):
                    # The starting point of CPSL (the warm-up model, or --model_name_or_path as given).
                    self.evaluate("warmup")
                if accelerator.is_main_process:
                    logger.info("stage init: teacher, prototypes and prior from the warm-up model")
                self.initialize_cpsl()
                self.model.train()
            round_index = distill_round_of(stage)
            if round_index and round_index != self.distill_round:
                if not self.history:  # no warm-up or CPSL stage ran: record the starting point
                    self.evaluate("warmup")
                if accelerator.is_main_process:
                    logger.info(
                        "stage %s: hard labels from the frozen previous model, a fresh student (%s)",
                        stage,
                        training.distill_init,
                    )
                self.start_distill_round(round_index)
                self.model.train()
            if progress is not None:
                progress.set_description(stage)
            adversarial = stage == "warmup" and self.discriminator is not None
            with accelerator.accumulate(self.model, *([self.discriminator] if adversarial else [])):
                # Source first, then target, whatever the stage (the streams' order is part of a resume).
                needs_source = not round_index or training.distill_source_loss
                needs_target = stage != "warmup" or adversarial
                source_batch = self._next_batch(self.source_loader) if needs_source else None
                target_batch = self._next_batch(self.target_loader) if needs_target else None
                # The target's ground truth leaves the batch before any loss sees it: only the pseudo-label
                # diagnostics read it.
                target_truth = None if target_batch is None else target_batch.pop("labels")
                if round_index:
                    losses = self.distill_losses(source_batch, target_batch)
                elif adversarial:
                    losses = self.adversarial_warmup_losses(source_batch, target_batch)
                elif stage == "warmup":
                    losses = self.source_losses(source_batch)
                else:
                    losses, pseudo_labels = self.cpsl_losses(source_batch, target_batch)
                    if self.pseudo_label_monitor is not None:
                        self.pseudo_label_monitor.update(stage, target_truth, pseudo_labels)
                batch_images = sum(
                    batch["pixel_values"].shape[0]
                    for batch in (source_batch, target_batch)
                    if batch is not None
                )
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients:
                    self._sync_prototype_gradient()
                    if training.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(self.model.parameters(), training.max_grad_norm)
                for optimizer in self._optimizers():
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if adversarial:  # after the student's step, as the reference (D sees detached outputs)
                    self.discriminator_step(losses["loss_discriminator"])
            for name, value in losses.items():
                value = value.detach()
                running[name] = running[name] + value if name in running else value
            window_images += batch_images
            if not accelerator.sync_gradients:
                continue
            self.scheduler.step()
            if self.prototype_optimizer is not None:
                self.prototype_scheduler.step()
            if adversarial:
                self.discriminator_scheduler.step()
            self._sync_buffers()
            if stage == "cpsl":
                self.teacher.update(self.unwrapped)
            self.step += 1
            window_steps += 1
            if progress is not None:
                progress.update(1)

            if self.step % training.logging_steps == 0 or self.step == stop:
                logs = self._log(
                    running,
                    window_steps,
                    window_images * accelerator.num_processes,
                    time.time() - window_start,
                )
                if progress is not None:
                    progress.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss")})
                elif accelerator.is_main_process:
                    logger.info("step %d/%d (%s): %s", self.step, total, stage, _format_logs(logs))
                running, window_steps, window_images, window_start = {}, 0, 0, time.time()
            end_of_stage = self.step in stage_ends
            periodic = bool(training.eval_steps) and self.step % training.eval_steps == 0
            if end_of_stage or periodic:
                self.evaluate(self.stage_at(self.step - 1))
            if (training.checkpointing_steps and self.step % training.checkpointing_steps == 0) or (
                self.step == stop and stop < total
            ):
                self.save()
        if progress is not None:
            progress.close()
        if self.step < total:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                print(
                    f"Stopped at step {self.step} of {total} (--stop_at_step); resume with "
                    f"--resume_from_checkpoint latest --output_dir {self.output_dir}"
                )
            accelerator.end_training()
            return self.history
        try:
            self.export()
        finally:  # trackers are closed even when the push fails
            accelerator.end_training()
        return self.history

    def _log(
        self, running: dict[str, torch.Tensor], steps: int, images: int, seconds: float
    ) -> dict[str, float]:
        """Average the device-side sums over the window and processes; the only host sync of the loop."""
        names = sorted(running)
        if not names or steps == 0:
            return {}
        stacked = torch.stack([running[name].float() for name in names]) / steps
        values = self.accelerator.reduce(stacked, reduction="mean").tolist()
        logs = dict(zip(names, values, strict=True))
        if self.pseudo_label_monitor is not None:
            logs.update(self.pseudo_label_monitor.window_summary())
        for optimizer in self._optimizers():
            for group in optimizer.optimizer.param_groups:
                logs[f"lr_{group['name']}"] = group["lr"]
        logs["images_per_second"] = images / max(seconds, 1e-9)
        self.accelerator.log(logs, step=self.step)
        return logs

    # ------------------------------------------------------------------ export
    def export(self) -> None:
        """save_pretrained of the chosen network, metrics.json, model card, optional push; the final table."""
        accelerator, training = self.accelerator, self.args.training
        accelerator.wait_for_everyone()
        exported_who = self.exported_network_name()
        network = self.teacher.module if exported_who == "teacher" else self.unwrapped
        model_dir = self.output_dir
        network.save_pretrained(
            model_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
        )
        metrics_path = model_dir / "metrics.json"
        final_stage = [name for name, _ in training_stages(training) if name in self.history][-1]
        final_key = max(self.history[final_stage], key=int)
        final = self.history[final_stage][final_key]
        exported = final.get(exported_who, final["student"])
        training_info = self._training_info(final_stage, int(final_key))
        card_path = None
        if accelerator.is_main_process:
            document = {
                "exported_model": exported_who,
                "final": {"stage": final_stage, "step": int(final_key), **exported},
                "history": self.history,
                "pseudo_labels": self.pseudo_label_history,
                "training": training_info,
            }
            metrics_path.write_text(json.dumps(document, indent=2))
            if self.args.training.save_predictions > 0:  # before the card, which links them
                self._save_predictions(network, model_dir / "predictions")
            card_path = self._write_card(exported, training_info)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # Everything local is written and reported before the push, so a failed push loses nothing.
            print(self.summary_table())
            print(f"\nModel ({final_stage} {exported_who}): {model_dir.resolve()}")
            print(f"Metrics: {metrics_path.resolve()}")
            if card_path is not None:
                print(f"Model card: {Path(card_path).resolve()}")
            if training.checkpointing_steps:
                print(f"Checkpoints: {(self.output_dir / 'checkpoints').resolve()}")
            print(f"Total time: {time.time() - self.started:.0f} s")
        if training.push_to_hub and accelerator.is_main_process:
            from cpsl_hf.hub import HubError, push_checkpoint

            try:
                url = push_checkpoint(model_dir, training.hub_model_id, private=training.hub_private)
            except HubError as error:
                raise HubError(
                    f"{error}\nThe run itself is complete and saved in {model_dir.resolve()}; push it later with "
                    f"`python scripts/push_to_hub.py --checkpoint {model_dir} --repo_id {training.hub_model_id}`"
                ) from error
            print(f"Pushed to {url}")

    def exported_network_name(self) -> str:
        """``student`` or ``teacher``: the network :meth:`export` saves. After distillation rounds it is the last
        round's student; otherwise ``--export_model`` (the student when no CPSL stage ran)."""
        if self.distill_round > 0 or not self.cpsl_initialized:
            return "student"
        return self.args.training.export_model

    def _training_info(self, final_stage: str, final_step: int) -> dict[str, Any]:
        args = self.args
        return {
            "source": args.data.source,
            "target": args.data.target,
            "backbone": args.model.model_name_or_path or args.model.backbone,
            "num_classes": args.data.num_classes,
            "warmup_steps": args.training.warmup_steps,
            "warmup_adversarial": args.training.warmup_adversarial,
            "cpsl_steps": args.training.cpsl_steps,
            "method": args.cpsl.method,
            "pseudo_labels": args.cpsl.pseudo_labels,
            "distill_rounds": args.training.distill_rounds,
            "distill_steps": args.training.distill_steps if args.training.distill_rounds else 0,
            "distill_init": args.training.distill_init if args.training.distill_rounds else None,
            "seed": args.training.seed,
            "config": args.training.config,
            "num_processes": self.accelerator.num_processes,
            "device": str(self.device),
            "hardware": torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else platform.processor() or "cpu",
            "training_seconds": round(time.time() - self.started, 1),
            "final_stage": final_stage,
            "final_step": final_step,
            "arguments": args.to_dict(),
        }

    def _write_card(self, metrics: dict[str, Any], training_info: dict[str, Any]) -> Path | None:
        """The model card (``cpsl_hf.hub``) from the exported network's final evaluation and this run's recipe."""
        from cpsl_hf import hub

        args = self.args
        data, training = args.data, args.training
        display = {"gta5": "GTA5", "synthia": "SYNTHIA", "cityscapes": "Cityscapes", "synthetic": "synthetic"}
        source = display.get(data.source, data.source)
        target = display.get(data.target, data.target)
        backbone = training_info["backbone"]
        card_info = {
            "model_name": self.output_dir.name,
            "source_dataset": "synthetic source" if data.source == "synthetic" else source,
            "target_dataset": "synthetic target" if data.target == "synthetic" else target,
            "eval_split": data.target_val_split,
            "datasets": list(dict.fromkeys([data.source, data.target])),
            "base_model": None if backbone in _preset_names() else backbone,
            "config": training.config or "defaults (configs/synthetic_demo.yaml)",
            "architecture": f"{backbone} ({self.unwrapped.config.decode_head} head, D={self.embedding_dim})",
            "stage": f"{training_info['final_stage']} ({self.exported_network_name()})",
            "steps": f"{training.warmup_steps} warm-up"
            + (
                f" (output-space adversarial, weight {training.lambda_adv})"
                if training.warmup_adversarial
                else ""
            )
            + f" + {training.cpsl_steps} {_METHOD_TITLES[args.cpsl.method]}"
            + _distill_recipe(training),
            "batch_size": f"{training.source_batch_size} + {training.target_batch_size} per process "
            f"x {self.accelerator.num_processes} process(es)",
            "crop_size": f"{data.crop_size[0]} x {data.crop_size[1]}",
            "seed": training.seed,
            "hardware": training_info["hardware"],
            "mixed_precision": training.mixed_precision,
            "evaluation": "whole image, no flip, at label resolution",
            "training_time_s": training_info["training_seconds"],
            "hyperparameters": {
                key: value
                for key, value in {**dataclasses.asdict(args.cpsl), **dataclasses.asdict(training)}.items()
                if isinstance(value, (int, float, str, bool)) and key not in ("output_dir", "config")
            },
            "num_classes": self.num_classes,
            "method": args.cpsl.method,
            "pseudo_labels": args.cpsl.pseudo_labels,
        }
        if training.hub_model_id:
            card_info["repo_id"] = training.hub_model_id
        return hub.write_model_card(self.output_dir, metrics, card_info)

    def _save_predictions(self, network: nn.Module, out_dir: Path) -> None:
        """Image | ground truth | prediction strips of the first ``--save_predictions`` validation images."""
        from cpsl_hf.visualization import save_prediction_strips

        save_prediction_strips(
            network,
            self.eval_loader(),
            out_dir,
            self.num_classes,
            max_images=self.args.training.save_predictions,
        )

    def summary_table(self) -> str:
        """Per-class target IoU after the warm-up, after CPSL (student, teacher) and after each distillation
        round (its student), as a Markdown table."""
        columns: list[tuple[str, dict[str, Any]]] = []
        for stage, _ in training_stages(self.args.training):
            if stage not in self.history:
                continue
            last = self.history[stage][max(self.history[stage], key=int)]
            for who, metrics in last.items():
                method = _METHOD_TITLES[self.args.cpsl.method].lower()
                title = {"warmup": "warm-up", "cpsl": f"{method} {who}"}.get(stage, stage)
                columns.append((title, metrics))
        if not columns:
            return ""
        names = columns[0][1]["class_names"]
        lines = [
            f"\nTarget ({self.args.data.target}) validation IoU (%), {self.num_classes} classes",
            "| class | " + " | ".join(title for title, _ in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for index, name in enumerate(names):
            cells = [_percent(metrics["per_category_iou"][index]) for _, metrics in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append(
            "| **mIoU** | " + " | ".join(f"**{_percent(m['mean_iou'])}**" for _, m in columns) + " |"
        )
        if self.num_classes == 16:
            lines.append(
                "| mIoU (13) | " + " | ".join(_percent(m.get("mean_iou_13")) for _, m in columns) + " |"
            )
        return "\n".join(lines)


def train(args: RunArguments) -> dict[str, Any]:
    """Run the UDA pipeline described by ``args`` (see :func:`cpsl_hf.training.arguments.parse_args`)."""
    return UDATrainer(args).train()


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _cross_entropy_at(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE of N x C x h x w logits upsampled (bilinear) to the N x H x W labels; ignore 255; float32; 0 when no
    pixel is labelled (see :func:`cpsl_hf.selflabel.masked_cross_entropy`)."""
    return masked_cross_entropy(_upsampled(logits, tuple(labels.shape[-2:])), labels, IGNORE_INDEX)


def _frozen_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` that never trains: no gradients, eval mode."""
    frozen = copy.deepcopy(network)
    frozen.requires_grad_(False)
    return frozen.eval()


def _distill_recipe(training: UDATrainingArguments) -> str:
    """The model card's words for the distillation rounds ("" without)."""
    if training.distill_rounds == 0:
        return ""
    start = "the initial weights" if training.distill_init == "pretrained" else "the previous model"
    return (
        f" + {training.distill_rounds} x {training.distill_steps} distillation (each round a fresh student "
        f"from {start}; hard labels of confidence > {training.distill_threshold}, "
        f"KL weight {training.lambda_distill_kl})"
    )


def _upsampled(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x C x h x w float maps resized (bilinear) to ``size``; the same tensor when already that size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)


def _resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x H x W bool -> N x h x w (nearest)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5


def _downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x H x W integer labels -> N x h x w (nearest)."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def _format_logs(logs: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4g}" for key, value in logs.items())


def _preset_names() -> set[str]:
    from cpsl_hf.configuration_cpsl import PRESETS

    return set(PRESETS)


def _percent(value) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"
    )


def _json_ready(value):
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, torch.Tensor):
        return _json_ready(value.tolist())
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _flat_config(args: RunArguments) -> dict[str, Any]:
    """Tracker-friendly flat config (scalars and strings only)."""
    flat = {}
    for group, values in args.to_dict().items():
        for key, value in values.items():
            flat[f"{group}/{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")


def _progress(iterable, enabled: bool, description: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True)


__all__ = [
    "OfflinePseudoLabels",
    "UDATrainer",
    "build_model",
    "distill_round_of",
    "flip_averaged_probabilities",
    "hard_pseudo_labels",
    "load_domain_dataset",
    "schedule_lr_factor",
    "stage_lr_factor",
    "train",
    "training_stages",
]
