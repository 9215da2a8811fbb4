"""What a finished run leaves behind: the exported model (``save_pretrained``), ``metrics.json``, the model card,
prediction strips, the per-class summary table, and the optional push to the Hub.

Every function reads a finished :class:`~cpsl_hf.training.loop.Trainer`; nothing here trains.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cpsl_hf.data.registry import DATASETS, dataset_spec
from cpsl_hf.utils import format_percent

from .faults import NonFiniteModelError

if TYPE_CHECKING:
    from .loop import Trainer

DATASET_DISPLAY_NAMES = {
    "gta5": "GTA5",
    "synthia": "SYNTHIA",
    "cityscapes": "Cityscapes",
    "synthetic": "synthetic",
}


def exported_network(trainer: Trainer) -> tuple[str, nn.Module]:
    """``(name, network)`` the run exports: what the last stage that ran exports (the student if none ran)."""
    stage = trainer.last_started_stage()
    return ("student", trainer.student) if stage is None else stage.exported()


def check_finite(network: nn.Module, who: str = "model") -> None:
    """Raise :class:`~cpsl_hf.training.faults.NonFiniteModelError` when a parameter or buffer of ``network`` holds
    a NaN or Inf: such a model is never saved or pushed. One host sync, at export."""
    bad = [
        name
        for name, tensor in itertools.chain(network.named_parameters(), network.named_buffers())
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteModelError(
            f"not exporting the {who}: {len(bad)} tensor(s) hold NaN or Inf ({shown}); nothing was saved or "
            "pushed. Lower --learning_rate or set --max_grad_norm and train again from the last checkpoint."
        )


def final_evaluation(trainer: Trainer) -> tuple[str, int]:
    """``(stage name, step)`` of the run's last evaluation."""
    final_stage = [stage.name for stage in trainer.stages if stage.name in trainer.history][-1]
    return final_stage, max(int(step) for step in trainer.history[final_stage])


def export_run(trainer: Trainer) -> None:
    """save_pretrained of the exported network, metrics.json, model card, optional push; the final table.

    Everything local is written and reported before the push, so a failed push loses nothing.
    """
    accelerator, training = trainer.accelerator, trainer.args.training
    accelerator.wait_for_everyone()
    exported_who, network = exported_network(trainer)
    check_finite(network, exported_who)
    model_dir = trainer.output_dir
    network.save_pretrained(
        model_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
    )
    metrics_path = model_dir / "metrics.json"
    final_stage, final_step = final_evaluation(trainer)
    final = trainer.history[final_stage][str(final_step)]
    exported = final.get(exported_who, final["student"])
    info = training_info(trainer, final_stage, final_step)
    card_path = None
    if accelerator.is_main_process:
        document = {
            "exported_model": exported_who,
            "final": {"stage": final_stage, "step": final_step, **exported},
            "history": trainer.history,
            "pseudo_labels": trainer.pseudo_label_history,
            "training": info,
        }
        metrics_path.write_text(json.dumps(document, indent=2))
        if training.save_predictions > 0:  # before the card, which links them
            save_predictions(trainer, network, model_dir / "predictions")
        card_path = write_card(trainer, exported, info)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(summary_table(trainer))
        print(f"\nModel ({final_stage} {exported_who}): {model_dir.resolve()}")
        print(f"Metrics: {metrics_path.resolve()}")
        if card_path is not None:
            print(f"Model card: {Path(card_path).resolve()}")
        if training.checkpointing_steps:
            print(f"Checkpoints: {(trainer.output_dir / 'checkpoints').resolve()}")
        print(f"Total time: {time.time() - trainer.started:.0f} s")
    if training.push_to_hub and accelerator.is_main_process:
        push(model_dir, training.hub_model_id, training.hub_private)


def push(model_dir: Path, repo_id: str, private: bool) -> None:
    """Push the exported folder; a failure says how to push the complete local run later."""
    from cpsl_hf.hub import HubError, push_checkpoint

    try:
        url = push_checkpoint(model_dir, repo_id, private=private)
    except HubError as error:
        raise HubError(
            f"{error}\nThe run itself is complete and saved in {model_dir.resolve()}; push it later with "
            f"`python scripts/push_to_hub.py --checkpoint {model_dir} --repo_id {repo_id}`"
        ) from error
    print(f"Pushed to {url}")


def training_info(trainer: Trainer, final_stage: str, final_step: int) -> dict[str, Any]:
    """The run's recipe and context, as written to ``metrics.json["training"]``."""
    args = trainer.args
    training, distill = args.training, args.distill
    return {
        "source": args.data.source,
        "target": args.data.target,
        "backbone": args.model.model_name_or_path or args.model.backbone,
        "num_classes": args.data.num_classes,
        "warmup_steps": training.warmup_steps,
        "warmup_adversarial": args.adversarial.warmup_adversarial,
        "cpsl_steps": training.cpsl_steps,
        "method": args.cpsl.method,
        "pseudo_labels": args.cpsl.pseudo_labels,
        "distill_rounds": distill.distill_rounds,
        "distill_steps": distill.distill_steps if distill.distill_rounds else 0,
        "distill_init": distill.distill_init if distill.distill_rounds else None,
        "stages": [{"name": stage.name, "steps": stage.steps} for stage in trainer.stages],
        "seed": training.seed,
        "config": training.config,
        "num_processes": trainer.accelerator.num_processes,
        "device": str(trainer.device),
        "hardware": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "training_seconds": round(time.time() - trainer.started, 1),
        "final_stage": final_stage,
        "final_step": final_step,
        "arguments": args.to_dict(),
    }


def recipe(trainer: Trainer) -> str:
    """The stages in words, consecutive equal stages counted: ``1000 warm-up + 300 CPSL + 2 x 300 distillation``."""
    parts: list[list] = []
    for stage in trainer.stages:
        if stage.steps == 0 and stage is not trainer.stages[0]:
            continue
        words = stage.recipe()
        if parts and parts[-1][0] == words:
            parts[-1][1] += 1
        else:
            parts.append([words, 1])
    return " + ".join(words if count == 1 else f"{count} x {words}" for words, count in parts)


def write_card(trainer: Trainer, metrics: dict[str, Any], info: dict[str, Any]) -> Path | None:
    """The model card (:mod:`cpsl_hf.hub`) from the exported network's final evaluation and the run's recipe."""
    from cpsl_hf import hub
    from cpsl_hf.configuration_cpsl import PRESETS

    args = trainer.args
    data, training = args.data, args.training
    source, target = (
        _display_name(getattr(data, flag), getattr(data, f"{flag}_dir")) for flag in ("source", "target")
    )
    backbone = info["backbone"]
    card_info = {
        "model_name": trainer.output_dir.name,
        "source_dataset": "synthetic source" if data.source == "synthetic" else source,
        "target_dataset": "synthetic target" if data.target == "synthetic" else target,
        "eval_split": data.target_val_split,
        "datasets": list(
            dict.fromkeys(
                Path(getattr(data, f"{flag}_dir")).name
                if getattr(data, flag) == "folder"
                else getattr(data, flag)
                for flag in ("source", "target")
            )
        ),
        "base_model": None if backbone in PRESETS else backbone,
        "config": training.config or "defaults (configs/synthetic_demo.yaml)",
        "architecture": f"{backbone} ({trainer.student.config.decode_head} head, D={trainer.embedding_dim})",
        "stage": f"{info['final_stage']} ({exported_network(trainer)[0]})",
        "steps": recipe(trainer),
        "batch_size": f"{training.source_batch_size} + {training.target_batch_size} per process "
        f"x {trainer.accelerator.num_processes} process(es)",
        "crop_size": f"{data.crop_size[0]} x {data.crop_size[1]}",
        "seed": training.seed,
        "hardware": info["hardware"],
        "mixed_precision": training.mixed_precision,
        "evaluation": "whole image, no flip, at label resolution",
        "training_time_s": info["training_seconds"],
        "hyperparameters": _hyperparameters(args),
        "num_classes": trainer.num_classes,
        "method": args.cpsl.method,
        "pseudo_labels": args.cpsl.pseudo_labels,
    }
    if training.hub_model_id:
        card_info["repo_id"] = training.hub_model_id
    return hub.write_model_card(trainer.output_dir, metrics, card_info)


def _hyperparameters(args) -> dict[str, Any]:
    """The card's hyperparameters table: the scalar arguments of the cpsl, adversarial, distill and training
    groups (argument names are unique across groups)."""
    groups = (args.cpsl, args.adversarial, args.distill, args.training)
    return {
        key: value
        for group in groups
        for key, value in dataclasses.asdict(group).items()
        if isinstance(value, (int, float, str, bool)) and key not in ("output_dir", "config")
    }


def save_predictions(trainer: Trainer, network: nn.Module, out_dir: Path) -> None:
    """Image | ground truth | prediction strips of the first ``--save_predictions`` validation images."""
    from cpsl_hf.visualization import save_prediction_strips

    save_prediction_strips(
        network,
        trainer.eval_loader(),
        out_dir,
        trainer.num_classes,
        max_images=trainer.args.training.save_predictions,
        palette=trainer.class_table.palette,
    )


def summary_table(trainer: Trainer) -> str:
    """Per-class target IoU at the end of every stage that ran, one column per evaluated network, in Markdown."""
    columns: list[tuple[str, dict[str, Any]]] = []
    for stage in trainer.stages:
        if stage.name not in trainer.history:
            continue
        by_step = trainer.history[stage.name]
        for who, metrics in by_step[max(by_step, key=int)].items():
            columns.append((stage.column_title(who), metrics))
    if not columns:
        return ""
    names = columns[0][1]["class_names"]
    lines = [
        f"\nTarget ({trainer.args.data.target}) validation IoU (%), {trainer.num_classes} classes",
        "| class | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for index, name in enumerate(names):
        cells = [format_percent(metrics["per_category_iou"][index]) for _, metrics in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mIoU** | " + " | ".join(f"**{format_percent(m['mean_iou'])}**" for _, m in columns) + " |"
    )
    if any(m.get("mean_iou_13") is not None for _, m in columns):
        lines.append(
            "| mIoU (13) | " + " | ".join(format_percent(m.get("mean_iou_13")) for _, m in columns) + " |"
        )
    return "\n".join(lines)


def _display_name(name: str, directory: str | None = None) -> str:
    """GTA5, SYNTHIA, Cityscapes, synthetic; your own folder by its folder name (``potsdam (folder)``); a prepared
    folder or Hub id as it is."""
    if name == "folder" and directory is not None:
        return f"{Path(directory).name} (folder)"
    return dataset_spec(name).display_name if name in DATASETS else name
