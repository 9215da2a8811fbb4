"""What a run is built from: its datasets, its student network and its optimisers (no training logic)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from cpsl_hf.data.protocols import IGNORE_INDEX

from .arguments import ConfigurationError, RunArguments


def load_domain_dataset(args: RunArguments, domain: str, split: str):
    """The ``datasets.Dataset`` of ``--source`` (domain "source") or ``--target`` (domain "target"), read through
    the dataset registry (:func:`cpsl_hf.data.registry.load_dataset`).

    ``split`` is "train" or the target's validation split name. Built-in names use their reader; anything
    else is a prepared folder or Hub repo read by ``load_prepared``.
    """
    from cpsl_hf.data.registry import dataset_spec, load_dataset

    from .arguments import resolve_classes

    data = args.data
    name = getattr(data, domain)
    spec = dataset_spec(name)
    directory = getattr(data, f"{domain}_dir") if spec.needs_data_dir else None
    tables = {}
    if spec.loader == "folder":  # decoded through the run's class table (the target's own, mapped by name)
        classes = resolve_classes(data)
        if domain == "source":
            tables = {"class_table": classes.table}
        else:
            tables = {"class_table": classes.target_table, "class_mapping": classes.mapping}
    return load_dataset(
        name,
        directory,
        split,
        num_classes=data.num_classes,
        streaming=data.streaming,
        domain=domain,
        num_images=data.synthetic_train_images if split == "train" else data.synthetic_val_images,
        image_size=tuple(data.synthetic_image_size),
        seed=data.synthetic_seed,
        cache_dir=data.synthetic_cache_dir,
        variant=data.synthetic_variant,
        reader_options=data.reader_options(name),
        **tables,
    )


def peek_dataset(dataset, count: int = 4) -> tuple[tuple[int, int], int | None]:
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
    """The student: a full CPSL checkpoint, a preset with random weights, or a pretrained encoder; with the
    backbone frozen (``--freeze_backbone``) and activation-checkpointed (``--gradient_checkpointing``) as asked."""
    model = _build_network(args)
    if args.model.freeze_backbone:
        model.backbone.requires_grad_(False)
    if args.model.gradient_checkpointing:
        if not model.backbone.supports_gradient_checkpointing:
            raise ConfigurationError(
                f"--gradient_checkpointing: the {model.config.backbone_type} backbone "
                f"({type(model.backbone).__name__}) does not support activation checkpointing in transformers"
            )
        model.backbone.activation_checkpointing_enable()
    return model


def _build_network(args: RunArguments) -> nn.Module:
    """The student's network as ``--model_name_or_path`` or ``--backbone`` describe it."""
    from cpsl_hf.configuration_cpsl import PRESETS, CPSLConfig
    from cpsl_hf.modeling_cpsl import CPSLForSemanticSegmentation

    from .arguments import resolve_classes

    num_classes = args.data.num_classes
    id2label = resolve_classes(args.data).table.id2label
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
        path = args.model.model_name_or_path
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigurationError(
                f"--model_name_or_path {path}: not a model folder (it has no config.json)"
            )
        try:  # the config first: its number of classes is checked before the weights load
            config = CPSLConfig.from_pretrained(path, **loaded_overrides)
            if config.num_labels != num_classes:
                raise ConfigurationError(
                    f"--model_name_or_path {path}: the checkpoint has "
                    f"{config.num_labels} classes, --num_classes is {num_classes}"
                )
            return CPSLForSemanticSegmentation.from_pretrained(path, config=config)
        except (OSError, ValueError) as error:  # no weights, wrong files, or a Hub repo that cannot be loaded
            if isinstance(error, ConfigurationError):
                raise
            reason = " ".join(str(error).split())
            raise ConfigurationError(
                f"--model_name_or_path {path}: cannot load a CPSL model ({reason})"
            ) from error
    if args.model.backbone in PRESETS:
        config = CPSLConfig.from_preset(
            args.model.backbone, num_labels=num_classes, id2label=id2label, **overrides
        )
        return CPSLForSemanticSegmentation(config)
    return CPSLForSemanticSegmentation.from_pretrained_backbone(
        args.model.backbone, num_labels=num_classes, id2label=id2label, **overrides
    )


def make_optimizer(kind: str, param_groups: list[dict[str, Any]], training) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` (momentum ``--sgd_momentum``) or ``AdamW`` (``--adam_betas``) over the groups.

    Both fused: the trainer skips a non-finite step on the device through their ``found_inf`` (as ``GradScaler``
    does), which only the fused implementations read."""
    if kind == "sgd":
        return torch.optim.SGD(
            param_groups, lr=training.learning_rate, momentum=training.sgd_momentum, fused=True
        )
    return torch.optim.AdamW(
        param_groups, lr=training.learning_rate, betas=tuple(training.adam_betas), fused=True
    )


def parameter_groups(model: nn.Module, args: RunArguments) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The network's optimiser groups (backbone, head) and W's group (``prototypes``).

    The prototypes are L2-normalised wherever they are used: weight decay would only shrink them. Their only
    gradient is ``lambda_sl L_SL``; under Adam the update would not depend on ``lambda_sl``, so by default they
    get SGD (the reference's) in an optimiser of their own when the network trains with AdamW.
    """
    training = args.training
    groups = model.parameter_groups()
    lr = training.learning_rate
    head_lr = lr * training.head_lr_multiplier
    if training.layer_decay is not None:
        backbone = layer_decay_groups(model, lr, training.layer_decay, training.weight_decay)
    else:
        backbone = [
            {
                "params": groups["backbone"],
                "lr": lr,
                "weight_decay": training.weight_decay,
                "name": "backbone",
            }
        ]
    network = [
        *[group for group in backbone if group["params"]],  # none when --freeze_backbone
        {"params": groups["head"], "lr": head_lr, "weight_decay": training.weight_decay, "name": "head"},
    ]
    prototypes = {
        "params": groups["prototypes"],
        "lr": args.cpsl.prototype_lr if args.cpsl.prototype_lr is not None else head_lr,
        "weight_decay": 0.0,
        "name": "prototypes",
    }
    return network, prototypes


def vit_layer_id(name: str, num_layers: int) -> int:
    """Depth of a plain-ViT backbone parameter for layer-wise decay (BEiT's numbering): 0 for the embeddings
    (patch projection, class / register tokens, position embeddings), i + 1 for block i, ``num_layers`` + 1
    for what follows the blocks (the final norm)."""
    from cpsl_hf.modeling_cpsl import vit_block_index

    if name.startswith("embeddings."):
        return 0
    block = vit_block_index(name)
    return block + 1 if block is not None else num_layers + 1


def layer_decay_groups(
    model: nn.Module, lr: float, decay: float, weight_decay: float
) -> list[dict[str, Any]]:
    """The backbone's optimiser groups under ``--layer_decay``: one per depth d of :func:`vit_layer_id`, at
    ``lr * decay ** (L + 1 - d)`` (L blocks), named ``backbone_embeddings``, ``backbone_block<i>`` and ``backbone``
    (the final norm, at ``lr``). Frozen parameters are left out. Raises ``ConfigurationError`` for a backbone that
    is not a plain ViT."""
    config = model.config
    if not config.is_plain_vit:
        raise ConfigurationError(
            f"--layer_decay is for plain ViT backbones (DINOv2, DINOv3); this model's is {config.backbone_type}"
        )
    num_layers = config.backbone_config.num_hidden_layers
    by_depth: dict[int, list[nn.Parameter]] = {}
    for name, parameter in model.backbone.named_parameters():
        if parameter.requires_grad:
            by_depth.setdefault(vit_layer_id(name, num_layers), []).append(parameter)

    def group_name(depth: int) -> str:
        if depth == 0:
            return "backbone_embeddings"
        return f"backbone_block{depth - 1}" if depth <= num_layers else "backbone"

    return [
        {
            "params": by_depth[depth],
            "lr": lr * decay ** (num_layers + 1 - depth),
            "weight_decay": weight_decay,
            "name": group_name(depth),
        }
        for depth in sorted(by_depth)
    ]
