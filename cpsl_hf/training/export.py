"""What a finished run leaves behind: the exported model (``save_pretrained``), ``metrics.json``, the model card,
prediction strips, the per-class summary table, and the optional push to the Hub.

Every function reads a finished :class:`~cpsl_hf.training.loop.Trainer`; nothing here trains.
"""

from __future__ import annotations

import itertools
import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cpsl_hf.utils import format_percent, json_ready

from .faults import NonFiniteModelError

if TYPE_CHECKING:
    from .loop import Trainer


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
            "logs": trainer.log_history,
            "training": info,
        }
        metrics_path.write_text(json.dumps(json_ready(document), indent=2))
        if training.save_predictions > 0:  # before the card, which links them
            save_predictions(
                trainer, network, model_dir / "predictions", inputs_dir=model_dir / EXAMPLES_DIRNAME
            )
        card_path = write_card(trainer, document)
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
    from cpsl_hf.configuration_cpsl import PRESETS, describe_architecture
    from cpsl_hf.provenance import hub_base_model

    args = trainer.args
    training, distill, data = args.training, args.distill, args.data
    return {
        "source": data.source,
        "target": data.target,
        "backbone": args.model.model_name_or_path or args.model.backbone,
        "base_model": hub_base_model(args.model.backbone, args.model.model_name_or_path, PRESETS),
        "architecture": describe_architecture(trainer.student.config),
        "eval_split": data.target_val_split,
        "batch_size": f"{training.source_batch_size} + {training.target_batch_size} per process "
        f"x {trainer.accelerator.num_processes} process(es)",
        "crop_size": f"{data.crop_size[0]} x {data.crop_size[1]}",
        "mixed_precision": training.mixed_precision,
        "recipe": recipe(trainer),
        "num_classes": args.data.num_classes,
        "warmup_steps": training.warmup_steps,
        "warmup_adversarial": args.adversarial.warmup_adversarial,
        "cpsl_steps": training.cpsl_steps,
        "method": args.cpsl.method,
        "pseudo_labels": args.cpsl.pseudo_labels,
        "distill_rounds": distill.distill_rounds,
        "distill_steps": distill.distill_steps if distill.distill_rounds else 0,
        "distill_init": distill.distill_init if distill.distill_rounds else None,
        "stages": [
            {
                "name": stage.name,
                "title": getattr(stage, "title", None) or stage.column_title(""),
                "steps": stage.steps,
            }
            for stage in trainer.stages
        ],
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


def write_card(trainer: Trainer, document: dict[str, Any]) -> Path | None:
    """The model card (:mod:`cpsl_hf.hub`) from the run's ``metrics.json`` record, with its plots: the same card
    ``scripts/push_to_hub.py`` writes from that file later."""
    from cpsl_hf import hub

    training = trainer.args.training
    overrides = {"model_name": trainer.output_dir.name}
    if training.hub_model_id:
        overrides["repo_id"] = training.hub_model_id
    return hub.write_run_card(trainer.output_dir, document, overrides)


EXAMPLES_DIRNAME = "examples"
"""The exported folder's copies of the validation images its strips show (what ``scripts/make_space.py`` offers)."""


def save_predictions(
    trainer: Trainer, network: nn.Module, out_dir: Path, inputs_dir: Path | None = None
) -> None:
    """Image | ground truth | prediction strips of the first ``--save_predictions`` validation images (and, with
    ``inputs_dir``, the images themselves)."""
    from cpsl_hf.visualization import save_prediction_strips

    save_prediction_strips(
        network,
        trainer.eval_loader(),
        out_dir,
        trainer.num_classes,
        max_images=trainer.args.training.save_predictions,
        inputs_dir=inputs_dir,
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
