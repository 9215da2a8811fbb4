"""Command-line and YAML arguments of the UDA trainer.

Six ``HfArgumentParser`` dataclasses describe a run completely. Each is an attribute of :class:`RunArguments` and
a section of a YAML recipe under the same name (:data:`SECTIONS`):

- ``model``: :class:`ModelArguments`, the network (a preset name, a pretrained encoder, or a full CPSL checkpoint).
- ``data``: :class:`DataArguments`, source and target datasets, label protocol, image and crop sizes.
- ``cpsl``: :class:`CPSLArguments`, every knob of the CPSL algorithm (SPEC.md), reference values as defaults.
- ``adversarial``: :class:`AdversarialWarmupArguments`, the optional output-space adversarial warm-up.
- ``distill``: :class:`DistillArguments`, the optional distillation rounds after the CPSL stage.
- ``training``: :class:`UDATrainingArguments`, schedule, optimiser, precision, logging, checkpoints, export.

A command-line flag is the field's name, whatever its group (``--warmup_adversarial``, ``--distill_rounds``).
The dataclass defaults ARE the built-in demo (``configs/synthetic_demo.yaml`` repeats them), so
``accelerate launch scripts/train.py`` with no argument runs the synthetic demo. A recipe is loaded with
``--config configs/NAME.yaml`` and any command-line flag overrides it (the command line wins).

Configuration that cannot work is rejected before anything is trained, with a message naming the argument: each
group's ``validate`` checks its own names, ranges and folders, and :func:`validate_arguments` runs them and the
checks that span groups; :func:`validate_against_datasets` checks the label protocol and crop size against the
loaded datasets.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cpsl_hf.data import registry

from .cpu_threads import parse_cpu_threads

KNOWN_DATASETS = registry.TRAINING_DATASETS
"""Dataset names ``--source`` / ``--target`` accept (from the registry); anything else must be a prepared folder
or a Hub repo id."""

SUPPORTED_NUM_CLASSES = {name: registry.dataset_spec(name).num_classes for name in KNOWN_DATASETS}
"""Label protocols each of those datasets provides (from the registry)."""

_HUB_REPO_ID = registry.HUB_REPO_ID

logger = logging.getLogger(__name__)


class ConfigurationError(ValueError):
    """A configuration that cannot work; the message names the offending argument."""


@dataclass
class ModelArguments:
    """Which network is adapted."""

    backbone: str = field(
        default="segformer-tiny",
        metadata={
            "help": "A CPSLConfig preset name (segformer-tiny, segformer-b0..b5, deeplabv2-r101, "
            "dinov2-small|base|large, dinov3-vits16|vitb16|vitl16, convnext-tiny|base|large, swin-tiny|base) with "
            "random weights, or the Hub id / local folder of a pretrained encoder (nvidia/mit-b5, "
            "microsoft/resnet-101, facebook/dinov2-large, facebook/dinov3-vitl16-pretrain-lvd1689m, "
            "facebook/convnext-base-224, microsoft/swin-tiny-patch4-window7-224) whose weights initialise the "
            "backbone (pyramid and heads random)."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Start from a full CPSL checkpoint (folder or Hub id), e.g. a finished warm-up model; "
            "overrides --backbone for the weights. Combine with --warmup_steps 0 to skip the warm-up."
        },
    )
    embedding_dim: int | None = field(
        default=None, metadata={"help": "Override the pixel-embedding size D of the preset."}
    )
    sl_temperature: float = field(
        default=0.08, metadata={"help": "Temperature tau of the self-labeling cosine classifier."}
    )
    segformer_embedding: Literal["pre_activation", "post_activation"] | None = field(
        default=None,
        metadata={
            "help": "SegFormer pixel embedding read by the self-labeling head: post_activation (the fuse layer's "
            "ReLU output the classifier reads, >= 0; the default of new models) or pre_activation (its BatchNorm "
            "output, signed). None keeps the preset's or the checkpoint's."
        },
    )

    freeze_backbone: bool = field(
        default=False,
        metadata={
            "help": "Train only the feature pyramid (ViTs), the decode head and W: the backbone's parameters get "
            "no gradient and no optimiser state (a linear-probe-like adaptation of a foundation model). A ResNet's "
            "BatchNorm statistics still follow the batches (train mode)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Activation checkpointing of the backbone's blocks (transformers' activation_checkpointing_"
            "enable, non-reentrant): their activations are recomputed in the backward instead of kept, for ViT-L "
            "at 512 x 512 on a 24 GB card. Same gradients, about a third more backbone compute. Backbones whose "
            "transformers class supports it: SegFormer, DINOv2, DINOv3 ViT, Swin (not ResNet, ConvNeXt)."
        },
    )

    def validate(self) -> None:
        """Choices, ``--sl_temperature`` and ``--model_name_or_path`` (a folder or a Hub repo id)."""
        _check_choices(self)
        _positive("sl_temperature", self.sl_temperature)
        path = self.model_name_or_path
        if path is not None and not os.path.isdir(path) and not _HUB_REPO_ID.match(path):
            raise ConfigurationError(f"--model_name_or_path: {path!r} is neither a folder nor a Hub repo id")


@dataclass
class DataArguments:
    """Source (labelled) and target (unlabelled) domains."""

    source: str = field(
        default="synthetic",
        metadata={
            "help": "Source dataset: synthetic | gta5 | synthia | cityscapes (with --source_dir), folder (your own "
            "images/ + masks/ folder, with --source_dir and --class_table), or a prepared folder / Hub dataset "
            "repo id written by scripts/prepare_dataset.py."
        },
    )
    source_dir: str | None = field(default=None, metadata={"help": "Local folder of the source dataset."})
    target: str = field(
        default="synthetic",
        metadata={"help": "Target dataset (same forms as --source); its validation split is evaluated."},
    )
    target_dir: str | None = field(default=None, metadata={"help": "Local folder of the target dataset."})
    target_train_split: str = field(default="train", metadata={"help": "Target split adapted on."})
    target_val_split: str = field(default="val", metadata={"help": "Target split evaluated on."})
    num_classes: int | None = field(
        default=None,
        metadata={
            "help": "Label protocol: 19 (GTA5), 16 or 13 (SYNTHIA) classes; default 19, or with --class_table the "
            "table's number of classes (a different value is an error)."
        },
    )
    class_table: str | None = field(
        default=None,
        metadata={
            "help": "Class table (YAML or JSON) of your own classes: names, the mask values of each class, void "
            "values, palette (cpsl_hf/data/class_table.py). The model predicts its classes; folder datasets "
            "are decoded through it."
        },
    )
    target_class_table: str | None = field(
        default=None,
        metadata={
            "help": "The target folder's own class table when it differs from --class_table (or from the "
            "--num_classes protocol): its classes are matched to the source's by name; classes on one side "
            "only are reported, a pair with no common class is an error."
        },
    )
    source_resize: list[int] | None = field(
        default=None,
        metadata={"nargs": 2, "help": "Resize source images to H W before cropping (None: keep size)."},
    )
    target_resize: list[int] | None = field(
        default=None,
        metadata={"nargs": 2, "help": "Resize target training images to H W before cropping (None: keep)."},
    )
    eval_resize: list[int] | None = field(
        default=None,
        metadata={
            "nargs": 2,
            "help": "Resize target validation images to H W for inference (None: original size). Labels stay "
            "at their original resolution: mIoU is always computed at label resolution.",
        },
    )
    crop_size: list[int] = field(
        default_factory=lambda: [128, 128], metadata={"nargs": 2, "help": "Training crop H W."}
    )
    scale_range: list[float] = field(
        default_factory=lambda: [0.5, 1.5], metadata={"nargs": 2, "help": "Random rescale range."}
    )
    source_augment: Literal["weak", "photometric"] = field(
        default="weak",
        metadata={
            "help": "Source crops: weak (rescale, crop, flip; the reference) or photometric (also the colour "
            "ops of the strong view: jitter, blur, photometric RandAugment; no geometry, no cutout)."
        },
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers per process."})
    streaming: bool = field(default=False, metadata={"help": "Stream prepared datasets instead of loading."})
    max_eval_images: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N validation images only (None: all)."}
    )
    synthetic_train_images: int = field(
        default=400, metadata={"help": "Synthetic shift: training images per domain."}
    )
    synthetic_val_images: int = field(default=100, metadata={"help": "Synthetic shift: validation images."})
    synthetic_image_size: list[int] = field(
        default_factory=lambda: [128, 256], metadata={"nargs": 2, "help": "Synthetic shift: image H W."}
    )
    synthetic_seed: int = field(default=0, metadata={"help": "Synthetic shift: generator seed."})
    synthetic_variant: Literal["default", "hard"] = field(
        default="default",
        metadata={
            "help": "Synthetic shift: default (the demo) or hard (the target's thin structures and small "
            "vehicles look unlike the source's: to study confirmation bias on the classes the warm-up barely "
            "knows)."
        },
    )
    synthetic_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache folder of the generated synthetic datasets."}
    )
    acdc_conditions: list[str] | None = field(
        default=None,
        metadata={
            "nargs": "+",
            "help": "ACDC: the conditions read (fog night rain snow; default every one found), e.g. night alone.",
        },
    )
    dark_zurich_times: list[str] = field(
        default_factory=lambda: ["night"],
        metadata={
            "nargs": "+",
            "help": "Dark Zurich train split: the times of day read (day twilight night).",
        },
    )

    def validate(self) -> None:
        """Choices, the label protocol, both datasets (name, folder, classes) and the image and crop sizes."""
        _check_choices(self)
        classes = resolve_classes(
            self, report=True
        )  # fills num_classes from --class_table, checks both tables
        self.num_classes = classes.table.num_classes
        self._check_benchmark_options()
        _check_dataset("source", self.source, self.source_dir, self.num_classes, self.class_table)
        _check_dataset("target", self.target, self.target_dir, self.num_classes, self.class_table)
        self._check_sizes()

    def _check_benchmark_options(self) -> None:
        from cpsl_hf.data.benchmarks import ACDC_CONDITIONS, DARK_ZURICH_TIMES

        for flag, values, allowed in (
            ("acdc_conditions", self.acdc_conditions or [], ACDC_CONDITIONS),
            ("dark_zurich_times", self.dark_zurich_times, DARK_ZURICH_TIMES),
        ):
            unknown = [value for value in values if value not in allowed]
            if unknown:
                raise ConfigurationError(
                    f"--{flag} {' '.join(unknown)}: expected some of {', '.join(allowed)}"
                )

    def reader_options(self, name: str) -> dict:
        """Keyword options of the reader of dataset ``name`` (ACDC's conditions, Dark Zurich's times)."""
        if name == "acdc" and self.acdc_conditions:
            return {"conditions": list(self.acdc_conditions)}
        if name == "dark_zurich":
            return {"times": tuple(self.dark_zurich_times)}
        return {}

    def _check_sizes(self) -> None:
        """Sizes are two positive numbers, the scale range is ordered, crops fit the resized and synthetic images."""
        for name in ("crop_size", "source_resize", "target_resize", "eval_resize", "synthetic_image_size"):
            _check_pair(name, getattr(self, name))
        _check_pair("scale_range", self.scale_range)
        if self.scale_range[0] > self.scale_range[1]:
            raise ConfigurationError(f"--scale_range: minimum above maximum ({self.scale_range})")
        crop_h, crop_w = self.crop_size
        for name in ("source_resize", "target_resize"):
            resize = getattr(self, name)
            if resize is not None and (crop_h > resize[0] or crop_w > resize[1]):
                raise ConfigurationError(
                    f"--crop_size {crop_h} {crop_w} is larger than --{name} {resize[0]} {resize[1]}"
                )
        if self.source == "synthetic" or self.target == "synthetic":
            height, width = self.synthetic_image_size
            if crop_h > height or crop_w > width:
                raise ConfigurationError(
                    f"--crop_size {crop_h} {crop_w} is larger than the synthetic images "
                    f"(--synthetic_image_size {height} {width})"
                )


@dataclass
class CPSLArguments:
    """The CPSL algorithm (SPEC.md). Defaults are the paper's; "reference" values reproduce the published code."""

    method: Literal["cpsl", "mean_teacher"] = field(
        default="cpsl",
        metadata={
            "help": "cpsl: self-labeling rectifies the pseudo labels (SPEC.md). mean_teacher: the built-in "
            "baseline, the same stage (views, losses, EMA, schedule) without self-labeling: pseudo labels are "
            "argmax P_ST (confidence > --pseudo_label_threshold), no L_SL."
        },
    )
    ema_momentum: float = field(
        default=0.99,
        metadata={
            "help": "EMA momentum m of the teacher and W' (a horizon of 1 / (1 - m) steps). 0.99 suits the "
            "demo's 300 CPSL steps; the reference's 0.999, which the real-data recipes set, is for tens of "
            "thousands (after 300 steps at 0.999 the teacher and W' still hold 74%% of their start)."
        },
    )
    teacher_mode: Literal["eval", "train"] = field(
        default="eval",
        metadata={
            "help": "The EMA teacher's forward: eval (no dropout / drop path, BatchNorm running statistics) or "
            "train (the reference code's: dropout and drop path on, BatchNorm with the target batch's statistics)."
        },
    )
    pseudo_label_resolution: Literal["crop", "decode"] = field(
        default="crop",
        metadata={
            "help": "Where the target pseudo labels and their cross-entropy live: crop (P_ST and P_SL upsampled "
            "bilinearly to the crop, the student's logits too, as the source loss; thin structures keep their "
            "pixels) or decode (the decoder's stride-4/8 grid, the reference). Self-labeling itself (sampling, "
            "Sinkhorn, prior) always works at the decoder's resolution."
        },
    )
    cutout_labels: Literal["ignore", "keep"] = field(
        default="ignore",
        metadata={
            "help": "Pseudo labels inside the strong view's cutout box, whose pixels the student cannot see: "
            "ignore (255) or keep them in the target loss. The consistency term always skips the box."
        },
    )
    ema_ramp: bool = field(
        default=False, metadata={"help": "Ramp the EMA momentum as min(1 - 1/(t+1), m) over CPSL steps t."}
    )
    sinkhorn_epsilon: float = field(default=0.05, metadata={"help": "Sinkhorn entropic regularisation eps."})
    sinkhorn_iterations: int = field(default=3, metadata={"help": "Sinkhorn-Knopp iterations."})
    samples_per_image: int = field(default=256, metadata={"help": "M: pixels sampled per target image."})
    bank_size: int = field(
        default=65536, metadata={"help": "Memory bank (FIFO queue) size; 0: no bank (Sinkhorn on the batch)."}
    )
    sampling: Literal["class_balanced", "uniform"] = field(
        default="class_balanced",
        metadata={"help": "Pixel sampling: class_balanced (paper Eq. 9) or uniform (reference code)."},
    )
    prior: Literal["dynamic", "static", "uniform"] = field(
        default="dynamic",
        metadata={
            "help": "Class prior r, the Sinkhorn class marginal: dynamic moving average from the histogram of "
            "argmax P_ST (paper), static at that histogram (reference code), or uniform (an ablation: "
            "SwAV's equipartition, every class gets the same share of the bank, no class balance)."
        },
    )
    prior_momentum: float = field(default=0.999, metadata={"help": "alpha of the dynamic prior update."})
    rectify_threshold: float = field(
        default=0.0,
        metadata={
            "help": "CPSL: ignore pixels whose normalised P_SL*P_ST maximum is below this (0: keep all)."
        },
    )
    rectification: bool = field(
        default=True,
        metadata={
            "help": "CPSL: rectify the pseudo labels with P_SL (argmax P_SL P_ST). --no_rectification trains on "
            "argmax P_ST while self-labeling runs on (an ablation; the published code's last version does this)."
        },
    )
    pseudo_label_threshold: float = field(
        default=0.0,
        metadata={
            "help": "--method mean_teacher: ignore pixels whose P_ST maximum is <= this (0: keep all)."
        },
    )
    lambda_sl: float = field(default=0.1, metadata={"help": "Weight lambda_1 of the self-labeling loss."})
    lambda_reg: float = field(
        default=5.0,
        metadata={
            "help": "Weight lambda_2 of the consistency loss, whose KL is averaged over classes as well as pixels "
            "(the reference code's reduction, for which 5 is tuned)."
        },
    )
    consistency: Literal["reference", "symmetric", "none"] = field(
        default="reference",
        metadata={
            "help": "reference: KL(P_w || P_s) of the self-labeling head, cosine to the EMA prototypes W' on both "
            "sides (the published code; it trains the student's features, never the prototypes; CPSL only). "
            "symmetric: KL(P_w||P_s)+KL(P_s||P_w) of the segmentation softmax (paper Eq. 13). none: no "
            "consistency term. Both KL terms skip the cutout box and pixels outside either view."
        },
    )
    target_loss: Literal["ce", "ce+rce"] = field(
        default="ce", metadata={"help": "Target loss: ce, or 0.1 CE + 1.0 RCE (reference code)."}
    )
    sl_grad_to_student_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Let L_SL reach the student's embeddings (costs a student pass on the weak view); "
            "default: L_SL trains W only, on teacher embeddings (reference)."
        },
    )
    sl_logits_branch: bool = field(
        default=False,
        metadata={
            "help": "Add the reference code's second Sinkhorn branch on the teacher's normalised logits."
        },
    )
    pseudo_labels: Literal["frozen", "offline", "teacher"] = field(
        default="frozen",
        metadata={
            "help": "Source of P_ST. frozen: the warm-up model, frozen, run on the weak view each step (the "
            "reference's semantics without files). offline: the frozen warm-up model's softmax computed once "
            "over the target set and stored (float16, C x h x w per image). teacher: the EMA teacher's softmax "
            "(P_ST and P_SL then come from one forward pass of one network: a variant, not the method)."
        },
    )
    prototype_optimizer: Literal["sgd", "adamw"] = field(
        default="sgd",
        metadata={
            "help": "Optimiser of the prototypes W, whose only gradient is lambda_sl L_SL: sgd (momentum "
            "--sgd_momentum, no weight decay; the reference's, where lambda_sl sets W's speed) or adamw (in the "
            "network's AdamW, whose normalisation cancels lambda_sl)."
        },
    )
    prototype_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of W (None: the decode head's, learning_rate x head_lr_multiplier)."
        },
    )
    pseudo_label_diagnostics: bool = field(
        default=True,
        metadata={
            "help": "Log how the pseudo labels fare: agreement of argmax P_SL with argmax P_ST, share changed by "
            "the rectification, top-2 cosine margin and, when the target training split has labels, mIoU and "
            "pixel accuracy of argmax P_ST and of the pseudo labels against them (a diagnostic: those labels "
            "never reach a loss)."
        },
    )
    init_max_images: int | None = field(
        default=None,
        metadata={"help": "Target images used to initialise prototypes and prior (None: the whole set)."},
    )
    mix: Literal["none", "classmix", "cutmix"] = field(
        default="none", metadata={"help": "Mix source crops into the strong target view."}
    )
    mix_prob: float = field(default=0.5, metadata={"help": "Probability of mixing a target image."})

    def validate(self) -> None:
        """Choices, momenta, Sinkhorn and sampling sizes, thresholds, loss weights and learning rate, and the
        options that need self-labeling (not with ``--method mean_teacher``) or every target image (offline P_ST)."""
        _check_choices(self)
        for name in ("ema_momentum", "prior_momentum"):
            _in_unit_interval(name, getattr(self, name), closed=True)
        if self.sinkhorn_epsilon <= 0 or self.sinkhorn_iterations < 1:
            raise ConfigurationError("--sinkhorn_epsilon must be > 0 and --sinkhorn_iterations >= 1")
        if self.samples_per_image < 1 or self.bank_size < 0:
            raise ConfigurationError("--samples_per_image must be >= 1 and --bank_size >= 0")
        _in_unit_interval("rectify_threshold", self.rectify_threshold)
        _in_unit_interval("mix_prob", self.mix_prob, closed=True)
        _in_unit_interval("pseudo_label_threshold", self.pseudo_label_threshold)
        if self.method == "mean_teacher":
            self._check_mean_teacher()
        if self.prototype_lr is not None:
            _positive("prototype_lr", self.prototype_lr)
        if self.pseudo_labels == "offline" and self.init_max_images is not None:
            raise ConfigurationError(
                f"--init_max_images {self.init_max_images} cannot be combined with --pseudo_labels offline: the "
                "stored P_ST must cover every target training image (unset --init_max_images)"
            )
        for name in ("lambda_sl", "lambda_reg"):
            _non_negative(name, getattr(self, name))

    def _check_mean_teacher(self) -> None:
        """The mean-teacher baseline trains no self-labeling head: none of the options that are parts of it."""
        if self.consistency == "reference":
            raise ConfigurationError(
                "--consistency reference needs the self-labeling head, which --method mean_teacher does not "
                "train; use --consistency symmetric or none"
            )
        if self.sl_grad_to_student_embeddings or self.sl_logits_branch:
            raise ConfigurationError(
                "--sl_grad_to_student_embeddings and --sl_logits_branch are parts of self-labeling; "
                "--method mean_teacher has none"
            )


@dataclass
class AdversarialWarmupArguments:
    """The output-space adversarial warm-up (AdaptSegNet; the reference's ``warm_up`` stage), off by default."""

    warmup_adversarial: bool = field(
        default=False,
        metadata={
            "help": "Output-space adversarial warm-up (AdaptSegNet, the reference's warm_up stage): a "
            "fully-convolutional discriminator on the softmax tells source from target crops; the student "
            "also learns to fool it on a target batch (weight --lambda_adv). Default: source-only warm-up."
        },
    )
    lambda_adv: float = field(
        default=0.01,
        metadata={
            "help": "Weight of the generator's adversarial loss in the warm-up (reference --adv 0.01)."
        },
    )
    adversarial_loss: Literal["ls", "vanilla"] = field(
        default="ls",
        metadata={
            "help": "GAN loss of --warmup_adversarial: ls (least squares, MSE; reference --gan LS) or "
            "vanilla (binary cross-entropy with logits)."
        },
    )
    discriminator_lr: float = field(
        default=1e-4,
        metadata={
            "help": "Adam learning rate of the discriminator (betas 0.9, 0.99; the warm-up's schedule; "
            "reference)."
        },
    )

    def validate(self) -> None:
        """Choices, ``--lambda_adv`` >= 0 and a positive ``--discriminator_lr``. What the adversarial warm-up needs
        of the other groups (warm-up steps, large enough crops) is checked by :func:`validate_arguments`."""
        _check_choices(self)
        _non_negative("lambda_adv", self.lambda_adv)
        _positive("discriminator_lr", self.discriminator_lr)


@dataclass
class DistillArguments:
    """Distillation rounds after the CPSL stage (SPEC.md stage 3; the reference's stages 2 and 3), off by default."""

    distill_rounds: int = field(
        default=0,
        metadata={
            "help": "Distillation rounds after the CPSL stage (SPEC stage 3; the reference's stages 2 and 3, "
            "2 rounds for the paper's 60.8 mIoU). Each round freezes the previous model, which gives hard "
            "pseudo labels (flip-averaged, confidence > --distill_threshold), and trains a fresh student "
            "(0: off)."
        },
    )
    distill_steps: int = field(default=300, metadata={"help": "Iterations of each distillation round."})
    distill_init: Literal["pretrained", "previous"] = field(
        default="pretrained",
        metadata={
            "help": "Student at the start of each round: pretrained (the weights the run started from, before "
            "the warm-up; the reference re-initialises from the pretrained backbone) or previous (a copy of the "
            "frozen previous model)."
        },
    )
    distill_threshold: float = field(
        default=0.95,
        metadata={
            "help": "Hard pseudo labels: pixels whose flip-averaged confidence is <= this are ignored."
        },
    )
    lambda_distill_kl: float = field(
        default=1.0,
        metadata={
            "help": "Weight of KL(P_prev(weak view) || P_student(strong view)) in a distillation round "
            "(reference: --distillation 1)."
        },
    )
    distill_source_loss: bool = field(
        default=True,
        metadata={"help": "Keep the source cross-entropy in the distillation rounds (reference)."},
    )
    distill_lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "Learning rates of the distillation rounds relative to the warm-up (the reference trains "
            "its stages 2 and 3 at 6x the CPSL backbone rate: 6e-4)."
        },
    )

    def validate(self) -> None:
        """Choices, the number and length of the rounds, the hard-label threshold, the KL weight, the lr scale."""
        _check_choices(self)
        _non_negative("distill_rounds", self.distill_rounds)
        if self.distill_rounds > 0 and self.distill_steps < 1:
            raise ConfigurationError(
                f"--distill_steps {self.distill_steps}: --distill_rounds {self.distill_rounds} needs "
                "--distill_steps >= 1"
            )
        _in_unit_interval("distill_threshold", self.distill_threshold)
        _non_negative("lambda_distill_kl", self.lambda_distill_kl)
        _positive("distill_lr_scale", self.distill_lr_scale)


@dataclass
class UDATrainingArguments:
    """Schedule, optimisation, logging, checkpoints and export."""

    config: str | None = field(
        default=None, metadata={"help": "YAML recipe (configs/NAME.yaml); command-line flags override it."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where everything is written; default outputs/<source>_to_<target>_<backbone>."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an --output_dir that holds one (its checkpoints are removed first); "
            "without it such a folder is refused unless the run resumes (--resume_from_checkpoint)."
        },
    )
    warmup_steps: int = field(default=1000, metadata={"help": "Source-only warm-up iterations."})
    cpsl_steps: int = field(default=300, metadata={"help": "CPSL self-training iterations."})
    source_batch_size: int = field(default=8, metadata={"help": "Source images per process and step."})
    target_batch_size: int = field(default=8, metadata={"help": "Target images per process and step."})
    eval_batch_size: int = field(default=8, metadata={"help": "Validation images per process and batch."})
    optimizer: Literal["sgd", "adamw"] = field(default="adamw", metadata={"help": "sgd (momentum) or adamw."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Backbone learning rate."})
    head_lr_multiplier: float = field(
        default=1.0, metadata={"help": "Decode head, classifier and prototypes W: learning_rate x this."}
    )
    layer_decay: float | None = field(
        default=None,
        metadata={
            "help": "Layer-wise learning-rate decay of a plain ViT backbone (DINOv2, DINOv3; BEiT's scheme): with L "
            "blocks, block i (0-based) trains at learning_rate x layer_decay^(L - i), the patch embedding, class "
            "and register tokens and position embeddings at learning_rate x layer_decay^(L + 1), the final "
            "norm at learning_rate; the pyramid and the heads are not decayed. In (0, 1]; None: off."
        },
    )
    cpsl_lr_scale: float = field(
        default=1.0, metadata={"help": "Learning rates of the CPSL stage relative to the warm-up."}
    )
    weight_decay: float = field(default=1e-2, metadata={"help": "Weight decay."})
    sgd_momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    adam_betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999], metadata={"nargs": 2, "help": "AdamW betas."}
    )
    lr_warmup_steps: int = field(
        default=50, metadata={"help": "Linear learning-rate warm-up at the start of each stage."}
    )
    poly_power: float = field(default=0.9, metadata={"help": "Polynomial learning-rate decay power."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Gradient clipping (None: off)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "Autocast precision (Sinkhorn always runs in float32)."}
    )
    cpu_threads: str = field(
        default="auto",
        metadata={
            "help": "CPU threads per process when training on the CPU: N, or auto (a value the user set in "
            "OMP_NUM_THREADS, else the physical cores divided by the processes of the node; wins over the "
            "one thread accelerate launch and torchrun fall back to)."
        },
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the training forwards: the student's, the EMA teacher's and the frozen P_ST "
            "model's (evaluation stays eager). It pays on GPUs (bench/train_step.py --gpu); on the CPU the "
            "demo's compile takes minutes and its steps are no faster (BENCHMARKS.md), hence off by default."
        },
    )
    allow_tf32: bool = field(
        default=True,
        metadata={
            "help": "On CUDA, let float32 matmuls and cuDNN convolutions use TF32 tensor cores "
            "(torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32, set while the run "
            "trains and put back after it; Ampere and newer GPUs, several times faster, 10-bit mantissa "
            "products). --allow_tf32 false: full float32 products. No effect on the CPU; under bf16 / fp16 "
            "autocast only the ops that stay in float32 are concerned."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed."})
    deterministic: bool = field(
        default=False, metadata={"help": "torch.use_deterministic_algorithms: bit-exact resumes."}
    )
    logging_steps: int = field(default=25, metadata={"help": "Log losses and diagnostics every N steps."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every N steps (None: at the end of each stage only)."}
    )
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save a resumable checkpoint every N steps (None: never)."}
    )
    checkpoints_total_limit: int | None = field(default=2, metadata={"help": "Keep the last K checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint folder, or 'latest' / 'auto' (the same: the newest valid checkpoint in "
            "output_dir, skipping damaged ones; start fresh when there is none yet, so a requeued job needs no "
            "edit). A named folder must pass the size and checksum check."
        },
    )
    stop_at_step: int | None = field(
        default=None,
        metadata={"help": "Stop (after saving a checkpoint) once this global step is reached; resume later."},
    )
    max_train_time: str | None = field(
        default=None,
        metadata={
            "help": "Wall-clock budget of this invocation, seconds or [HH:]MM:SS: once spent, the run saves a "
            "checkpoint and exits with the preempted status (checked every --logging_steps); resume later."
        },
    )
    max_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "Stop (exit status 70, no checkpoint, no export) after this many consecutive steps with a "
            "non-finite loss or gradient; each such step is skipped (no update reaches any state)."
        },
    )
    report_to: Literal["tensorboard", "wandb", "none"] = field(
        default="none", metadata={"help": "Experiment tracker."}
    )
    progress_bar: bool = field(default=True, metadata={"help": "Show progress bars (main process only)."})
    eval_teacher: bool = field(default=True, metadata={"help": "Also evaluate the EMA teacher."})
    export_model: Literal["student", "teacher"] = field(
        default="student", metadata={"help": "Which network is saved as the final model."}
    )
    save_predictions: int = field(
        default=4,
        metadata={
            "help": "Save N image | ground truth | prediction strips of the target validation split after "
            "every evaluation (output_dir/predictions/<stage>-step<N>/) and with the exported model, where "
            "the model card shows them (0: none)."
        },
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final model and card to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id for --push_to_hub."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo private."})

    def validate(self) -> None:
        """Choices, stage lengths, batch sizes and intervals, optimisation, the tracker, the Hub repo id and the
        checkpoint to resume from."""
        _check_choices(self)
        for name in ("warmup_steps", "cpsl_steps"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"--{name} must be >= 0")
        for name in (
            "source_batch_size",
            "target_batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "max_nonfinite_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"--{name} must be >= 1")
        for name in ("eval_steps", "checkpointing_steps", "checkpoints_total_limit", "stop_at_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigurationError(f"--{name} must be >= 1 (or unset)")
        self._check_optimisation()
        try:
            parse_cpu_threads(self.cpu_threads)
        except ValueError as error:
            raise ConfigurationError(str(error)) from None
        if self.max_train_time is not None:
            parse_duration(self.max_train_time)  # raises ConfigurationError when malformed
        hub_parts = (self.hub_model_id or "").split("/")
        if self.push_to_hub and (len(hub_parts) != 2 or not all(hub_parts)):
            raise ConfigurationError(
                f"--push_to_hub needs --hub_model_id USER/NAME (got {self.hub_model_id!r}): the model card "
                "names the repo in its loading code"
            )
        _check_tracker(self.report_to)
        resume = self.resume_from_checkpoint
        if resume not in (None, "latest", "auto") and not os.path.isdir(resume):
            raise ConfigurationError(f"--resume_from_checkpoint: folder {resume!r} does not exist")

    def _check_optimisation(self) -> None:
        """Learning rate and its multipliers, weight decay, SGD momentum and Adam betas, schedule, clipping."""
        if self.learning_rate <= 0:
            raise ConfigurationError("--learning_rate must be positive")
        for name in ("head_lr_multiplier", "cpsl_lr_scale"):
            _positive(name, getattr(self, name))
        for name in ("weight_decay", "poly_power", "lr_warmup_steps"):
            _non_negative(name, getattr(self, name))
        _in_unit_interval("sgd_momentum", self.sgd_momentum)
        betas = self.adam_betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigurationError(f"--adam_betas {betas}: expected two values in [0, 1)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigurationError(f"--max_grad_norm {self.max_grad_norm} must be positive (or unset)")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigurationError(f"--layer_decay {self.layer_decay} must be in (0, 1] (or unset)")


SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "cpsl": CPSLArguments,
    "adversarial": AdversarialWarmupArguments,
    "distill": DistillArguments,
    "training": UDATrainingArguments,
}
"""YAML section (and :class:`RunArguments` attribute) -> its argument group, in the order they are parsed."""

ARGUMENT_CLASSES = tuple(SECTIONS.values())


@dataclass
class RunArguments:
    """All argument groups of one run; each attribute is named as the group's YAML section (:data:`SECTIONS`)."""

    model: ModelArguments
    data: DataArguments
    cpsl: CPSLArguments
    adversarial: AdversarialWarmupArguments
    distill: DistillArguments
    training: UDATrainingArguments

    def groups(self) -> list[Any]:
        """The argument groups, in the order of :data:`SECTIONS`."""
        return [getattr(self, section) for section in SECTIONS]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict, one entry per section (for metrics.json, checkpoints, trackers and the model card)."""
        return {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}


def _field_names() -> dict[str, type]:
    return {f.name: cls for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe into a flat ``{argument: value}`` dict.

    The file may be flat or grouped in the sections of :data:`SECTIONS` (``model:``, ``data:``, ``cpsl:``,
    ``adversarial:``, ``distill:``, ``training:``), where each key must be an argument of that section's group.
    Raises :class:`ConfigurationError` naming ``--config`` and the unknown key or section, or the misplaced key
    with the section it is in and the one it belongs to.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"--config: no such file {str(path)!r}")
    with open(path) as handle:
        content = yaml.safe_load(handle) or {}
    if not isinstance(content, dict):
        raise ConfigurationError(f"--config {path}: expected a mapping of argument names to values")
    flat = _flatten_sections(path, content)
    unknown = sorted(set(flat) - set(_field_names()), key=str)
    if unknown:
        raise ConfigurationError(f"--config {path}: unknown argument(s) {', '.join(map(str, unknown))}")
    if "config" in flat:
        raise ConfigurationError(f"--config {path}: a config file cannot name another config")
    return flat


def _flatten_sections(path: Path, content: dict[Any, Any]) -> dict[Any, Any]:
    """The top-level keys and every section's keys in one dict. A known argument in another group's section, a
    mapping under a name that is neither a section nor an argument, or a section that is not a mapping, is an
    error; unknown keys are left for the caller to report."""
    group_of = _field_names()
    section_of = {group: section for section, group in SECTIONS.items()}
    flat: dict[Any, Any] = {}
    misplaced = []
    for key, value in content.items():
        if key not in SECTIONS:
            if key not in group_of and isinstance(value, dict):
                raise ConfigurationError(
                    f"--config {path}: unknown section {key!r}; the sections are {', '.join(SECTIONS)}"
                )
            _add_once(path, flat, key, value)
            continue
        if not isinstance(value, dict | None):
            raise ConfigurationError(
                f"--config {path}: section {key}: expected a mapping of arguments to values"
            )
        for name, item in (value or {}).items():
            if name in group_of and group_of[name] is not SECTIONS[key]:
                misplaced.append(
                    f"{name} is in section {key}: but belongs in section {section_of[group_of[name]]}:"
                )
            _add_once(path, flat, name, item)
    if misplaced:
        raise ConfigurationError(f"--config {path}: {'; '.join(misplaced)}")
    return flat


def _add_once(path: Path, flat: dict[Any, Any], name: Any, value: Any) -> None:
    """``flat[name] = value``; a recipe that gives an argument twice (top level and in a section) is an error."""
    if name in flat:
        raise ConfigurationError(f"--config {path}: {name} is given twice; keep one")
    flat[name] = value


def parse_args(argv: list[str] | None = None) -> RunArguments:
    """Parse ``argv`` (default ``sys.argv[1:]``): ``--config FILE`` values first, command-line flags on top.

    Runs :func:`validate_arguments` on the result, so configuration errors surface before any model or
    dataset is built.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    if known.config is not None:
        parser.set_defaults(**load_config_file(known.config))
    groups = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    args = RunArguments(**dict(zip(SECTIONS, groups, strict=True)))
    validate_arguments(args)
    return args


def default_output_dir(args: RunArguments) -> str:
    """``outputs/<source>_to_<target>_<backbone>`` with path separators made safe (a ``folder`` dataset is named
    by its folder)."""

    def slug(text: str) -> str:
        return re.sub(r"[^\w.-]+", "-", Path(text).name if os.path.isdir(text) else text).strip("-")

    def name(flag: str) -> str:  # your own folder by its folder name
        directory = getattr(args.data, f"{flag}_dir")
        dataset = getattr(args.data, flag)
        return slug(Path(directory).name) if dataset == "folder" and directory else slug(dataset)

    backbone = args.model.model_name_or_path or args.model.backbone
    return os.path.join("outputs", f"{name('source')}_to_{name('target')}_{slug(backbone)}")


def dataset_kind(name: str) -> str:
    """``name`` -> one of KNOWN_DATASETS, ``"prepared_dir"`` (a local folder), ``"hub"`` (a repo id) or
    ``"unknown"`` (:func:`cpsl_hf.data.registry.dataset_kind` over the names the trainer accepts)."""
    return registry.dataset_kind(name, KNOWN_DATASETS)


@dataclass(frozen=True)
class RunClasses:
    """The classes of a run: ``table`` (what the model predicts: ``--class_table`` or the ``--num_classes``
    protocol), ``target_table`` (how the target's masks decode: ``--target_class_table``, else ``table``) and
    ``mapping`` (target classes -> the model's, by name; None when the target uses ``table``)."""

    table: Any
    target_table: Any
    mapping: Any = None


def resolve_classes(data: DataArguments, report: bool = False) -> RunClasses:
    """Load and check ``--class_table`` / ``--target_class_table`` against ``--num_classes`` and the datasets.

    Raises:
        ConfigurationError: a table that cannot be read or breaks a rule (file, key, reason), an explicit
            ``--num_classes`` that disagrees with the table, a ``folder`` dataset without a table, a target table
            for a dataset that is not a folder, or source / target tables with no common class.

    ``report``: log the classes found on one side only (validation does, once per run).
    """
    from cpsl_hf.data.class_table import ClassTableError, load_class_table, map_class_tables, protocol_table

    def load(flag: str, path: str):
        try:
            return load_class_table(path)
        except ClassTableError as error:
            raise ConfigurationError(f"--{flag} {error}") from None

    if data.class_table is not None:
        table = load("class_table", data.class_table)
        if data.num_classes is not None and data.num_classes != table.num_classes:
            raise ConfigurationError(
                f"--num_classes {data.num_classes} disagrees with --class_table {data.class_table}, which has "
                f"{table.num_classes} classes; drop --num_classes (the table sets it)"
            )
    else:
        num_classes = 19 if data.num_classes is None else data.num_classes
        if num_classes not in (19, 16, 13):
            raise ConfigurationError(
                f"--num_classes {num_classes}: supported protocols are 19, 16 and 13; for other classes "
                "pass --class_table FILE"
            )
        table = protocol_table(num_classes)
    for flag in ("source", "target"):
        if (
            getattr(data, flag) == "folder"
            and data.class_table is None
            and not (flag == "target" and data.target_class_table is not None)
        ):
            raise ConfigurationError(f"--{flag} folder needs --class_table FILE (the classes of its masks)")
    if data.target_class_table is None:
        return RunClasses(table, table)
    if data.target != "folder":
        raise ConfigurationError(
            f"--target_class_table: only a folder target (--target folder) is decoded through a table of its "
            f"own, got --target {data.target}"
        )
    target_table = load("target_class_table", data.target_class_table)
    try:
        mapping = map_class_tables(table, target_table)
    except ClassTableError as error:
        raise ConfigurationError(f"--target_class_table {error}") from None
    if report and (mapping.source_only or mapping.target_only):
        logger.warning("classes of --class_table and --target_class_table: %s", mapping.summary())
    return RunClasses(table, target_table, None if mapping.is_identity else mapping)


def _check_dataset(
    flag: str, name: str, directory: str | None, num_classes: int, class_table: str | None = None
) -> None:
    kind = dataset_kind(name)
    if kind == "unknown":
        raise ConfigurationError(
            f"--{flag}: unknown dataset {name!r}; expected one of {', '.join(KNOWN_DATASETS)}, "
            "a folder written by scripts/prepare_dataset.py, or a Hub dataset repo id (owner/name)"
        )
    if kind in KNOWN_DATASETS and registry.dataset_spec(kind).needs_data_dir:
        if directory is None:
            raise ConfigurationError(f"--{flag}_dir: --{flag} {name} needs the dataset's local folder")
        if not os.path.isdir(directory):
            raise ConfigurationError(f"--{flag}_dir: folder {directory!r} does not exist (--{flag} {name})")
    if class_table is not None and kind in KNOWN_DATASETS and registry.dataset_spec(kind).loader != "folder":
        from cpsl_hf.data import protocols

        if num_classes not in protocols.SUPPORTED_NUM_CLASSES or load_table_names(class_table) != tuple(
            protocols.class_names(num_classes)
        ):
            raise ConfigurationError(
                f"--{flag} {name} is read as a built-in Cityscapes protocol, but --class_table {class_table} has "
                "other classes; use --{flag} folder for a dataset of your own classes".replace("{flag}", flag)
            )
    if (
        kind in SUPPORTED_NUM_CLASSES
        and SUPPORTED_NUM_CLASSES[kind]
        and num_classes not in SUPPORTED_NUM_CLASSES[kind]
    ):
        allowed = " or ".join(str(n) for n in SUPPORTED_NUM_CLASSES[kind])
        raise ConfigurationError(
            f"--num_classes {num_classes} disagrees with --{flag} {name}, which provides {allowed} classes"
        )


def load_table_names(path: str) -> tuple[str, ...]:
    """The class names of the table at ``path`` (already checked by :func:`resolve_classes`)."""
    from cpsl_hf.data.class_table import load_class_table

    return load_class_table(path).names


def _check_pair(flag: str, values: list | None, positive: bool = True) -> None:
    if values is None:
        return
    if len(values) != 2 or (positive and any(v <= 0 for v in values)):
        raise ConfigurationError(f"--{flag}: expected two positive numbers, got {values}")


def _check_choices(group: Any) -> None:
    """Literal-typed arguments of ``group`` hold one of their choices (values from a YAML file bypass argparse)."""
    for name, hint in typing.get_type_hints(type(group)).items():
        value = getattr(group, name)
        optional = type(None) in typing.get_args(hint)
        if optional:  # Literal[...] | None: None is allowed, any other value must be a choice
            if value is None:
                continue
            hint = next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)
        if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            choices = " | ".join(typing.get_args(hint)) + (" (or unset)" if optional else "")
            raise ConfigurationError(f"--{name} {value!r}: expected one of {choices}")


def parse_duration(value: str | float) -> float:
    """``--max_train_time``: seconds (``5400``, ``90.5``) or ``[HH:]MM:SS`` (``1:30:00``) -> positive seconds."""
    text = str(value).strip()
    parts = text.split(":")
    try:
        if len(parts) > 3 or any(not part.strip() for part in parts):
            raise ValueError
        numbers = [float(part) for part in parts]
    except ValueError:
        raise ConfigurationError(
            f"--max_train_time {value!r}: expected seconds or [HH:]MM:SS, e.g. 3600 or 1:00:00"
        ) from None
    seconds = 0.0
    for number in numbers:
        seconds = seconds * 60.0 + number
    if any(number < 0 for number in numbers) or not seconds > 0 or seconds != seconds:
        raise ConfigurationError(f"--max_train_time {value!r} must be a positive duration")
    return seconds


def _non_negative(flag: str, value: float) -> None:
    if not value >= 0:  # written so that NaN fails too
        raise ConfigurationError(f"--{flag} {value} must be >= 0")


def _positive(flag: str, value: float) -> None:
    if not value > 0:
        raise ConfigurationError(f"--{flag} {value} must be positive")


def _in_unit_interval(flag: str, value: float, closed: bool = False) -> None:
    """``value`` in [0, 1) (``closed``: [0, 1])."""
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise ConfigurationError(f"--{flag} {value} must lie in [0, {'1]' if closed else '1)'}")


def _check_tracker(report_to: str) -> None:
    """The package of ``--report_to`` is installed."""
    import importlib.util

    if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigurationError("--report_to wandb: the wandb package is not installed")
    if (
        report_to == "tensorboard"
        and importlib.util.find_spec("tensorboard") is None
        and importlib.util.find_spec("tensorboardX") is None
    ):
        raise ConfigurationError("--report_to tensorboard: the tensorboard package is not installed")


def _check_adversarial_warmup(args: RunArguments) -> None:
    """``--warmup_adversarial`` needs warm-up steps, and crops of at least 32 x 32 for the discriminator."""
    if not args.adversarial.warmup_adversarial:
        return
    if args.training.warmup_steps < 1:
        raise ConfigurationError(
            "--warmup_adversarial needs --warmup_steps >= 1 (the discriminator only trains in the warm-up); "
            "pass --warmup_adversarial false to skip it"
        )
    crop_h, crop_w = args.data.crop_size
    if crop_h < 32 or crop_w < 32:
        raise ConfigurationError(
            f"--crop_size {crop_h} {crop_w} is too small for --warmup_adversarial: the discriminator's five "
            "stride-2 layers need crops of at least 32 x 32"
        )


def validate_arguments(args: RunArguments) -> None:
    """Reject configurations that cannot work, before anything is built. Fills ``output_dir`` if unset.

    Every group checks itself (its ``validate``); the checks here span groups: what the adversarial warm-up needs
    of the schedule and the crops, and that the run has something to train.

    Raises:
        ConfigurationError: with a message that names the argument (``--source``, ``--crop_size``, ...).
    """
    for group in args.groups():
        group.validate()
    _check_adversarial_warmup(args)
    training, distill = args.training, args.distill
    if training.warmup_steps + training.cpsl_steps + distill.distill_rounds * distill.distill_steps == 0:
        raise ConfigurationError(
            "--warmup_steps, --cpsl_steps and --distill_rounds are all 0: nothing to train"
        )
    if training.output_dir is None:
        training.output_dir = default_output_dir(args)


def validate_against_datasets(
    args: RunArguments,
    source_image_size: tuple[int, int],
    target_image_size: tuple[int, int],
    source_max_label: int | None = None,
    target_max_label: int | None = None,
) -> None:
    """Checks that need the loaded datasets: crop size vs image size, label ids vs ``--num_classes``.

    Args:
        source_image_size / target_image_size: (H, W) of the training images as the loader yields them
            (after ``--source_resize`` / ``--target_resize``).
        source_max_label / target_max_label: largest non-ignored train id seen in a few labels (None: unknown).
    """
    crop_h, crop_w = args.data.crop_size
    for flag, (height, width) in (("source", source_image_size), ("target", target_image_size)):
        if crop_h > height or crop_w > width:
            raise ConfigurationError(
                f"--crop_size {crop_h} {crop_w} is larger than the {flag} images ({height} x {width}); "
                f"lower --crop_size or set --{flag}_resize"
            )
    for flag, max_label in (("source", source_max_label), ("target", target_max_label)):
        if max_label is not None and max_label >= args.data.num_classes:
            raise ConfigurationError(
                f"--num_classes {args.data.num_classes} disagrees with --{flag} "
                f"{getattr(args.data, flag)}: its labels contain train id {max_label}"
            )
