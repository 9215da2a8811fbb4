"""The model card's pictures, drawn with matplotlib from a training run's ``metrics.json``.

- :func:`miou_figure`: target mIoU over the training steps, one line per evaluated network (student, teacher),
  each stage shaded (warm-up, CPSL / mean teacher, each distillation round);
- :func:`per_class_figure`: per-class IoU of the starting point (the warm-up) against the exported model, as
  paired bars sorted by gain;
- :func:`pseudo_label_figure`: the pseudo-label diagnostics over steps (mIoU of argmax ``P_ST``, argmax
  ``P_SL`` and of the labels trained on, against the target's ground truth), when they were logged;
- :func:`write_card_plots`: all of them that the record allows, as PNG files in ``MODEL_DIR/plots/``.

matplotlib is an optional dependency (``pip install cpsl-hf[demo]``); :func:`matplotlib_available` says
whether it is installed. Every figure function returns the ``matplotlib.figure.Figure`` (tests read its data).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLOTS_DIRNAME = "plots"

#: The pseudo-label diagnostics of :class:`cpsl_hf.training.diagnostics.PseudoLabelMonitor`, as logged.
PSEUDO_LABEL_SERIES = (
    ("pseudo_p_st_miou", "argmax P_ST (no self-labeling)"),
    ("pseudo_p_sl_miou", "argmax P_SL (the clustering alone)"),
    ("pseudo_pseudo_labels_miou", "labels trained on"),
)

_STAGE_COLOURS = ("#dbe9f6", "#fde2c8", "#dcefd9", "#efdcef", "#f6f0c8", "#d9eeee")


@dataclass(frozen=True)
class CardPlot:
    """One picture of the card: its path relative to the model folder and what it shows (the image's alt text)."""

    path: str
    title: str


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def stage_spans(document: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """``(title, first step, last step)`` of every stage that trained, in order, on the run's global step axis
    (a stage of ``n`` steps starting after step ``s`` covers ``s .. s + n``)."""
    spans, start = [], 0
    for stage in (document.get("training") or {}).get("stages") or []:
        steps = int(stage["steps"])
        if steps > 0:
            spans.append((str(stage.get("title") or stage["name"]), start, start + steps))
        start += steps
    return spans


def evaluation_series(document: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """``{network: [(step, mIoU in %), ...]}`` over the whole run, by step, from ``history`` (stage -> step ->
    network -> metrics). A distillation round's student continues the student line; an undefined mIoU is
    skipped."""
    series: dict[str, list[tuple[int, float]]] = {}
    for by_step in (document.get("history") or {}).values():
        for step, by_network in by_step.items():
            for network, metrics in by_network.items():
                value = metrics.get("mean_iou")
                if value is not None and math.isfinite(value):
                    series.setdefault(network, []).append((int(step), 100.0 * float(value)))
    return {network: sorted(points) for network, points in series.items()}


def _shade_stages(axes, spans: list[tuple[str, int, int]]) -> None:
    for index, (title, first, last) in enumerate(spans):
        axes.axvspan(
            first, last, color=_STAGE_COLOURS[index % len(_STAGE_COLOURS)], alpha=0.8, lw=0, zorder=0
        )
        axes.text(
            (first + last) / 2, 1.01, title, transform=axes.get_xaxis_transform(), ha="center", va="bottom",
            fontsize=8,
        )  # fmt: skip


def _curves_over_steps(
    document: Mapping[str, Any],
    series: Mapping[str, list[tuple[int, float]]],
    ylabel: str,
    height: float,
    **style,
):
    """One line per entry of ``series`` (``label: [(step, value), ...]``) over the run's steps, stages shaded."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.0, height), dpi=100)
    _shade_stages(axes, stage_spans(document))
    for label, points in series.items():
        steps, values = zip(*points)
        axes.plot(steps, values, label=label, zorder=2, **style)
    axes.set_xlabel("training step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3, zorder=1)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def miou_figure(document: Mapping[str, Any]):
    """Target mIoU (%) over training steps, one line per network of :func:`evaluation_series`, stages shaded."""
    target = (document.get("training") or {}).get("target") or "target"
    return _curves_over_steps(
        document, evaluation_series(document), f"{target} validation mIoU (%)", 3.6, marker="o", markersize=3
    )


def reference_metrics(document: Mapping[str, Any]) -> dict[str, Any] | None:
    """The starting point's evaluation: the first stage's last student evaluation (the warm-up's end, or the loaded
    model at step 0 for a run that skipped its warm-up); ``None`` when the run has nothing after it (a warm-up
    only run's reference is its result)."""
    history = document.get("history") or {}
    stages = [stage["name"] for stage in (document.get("training") or {}).get("stages") or []]
    first = stages[0] if stages else next(iter(history), None)
    if first not in history or not history[first]:
        return None
    later = [name for name in history if name != first and history[name]]
    if not later:
        return None
    by_step = history[first]
    return by_step[max(by_step, key=int)].get("student")


def per_class_gains(
    reference: Mapping[str, Any], final: Mapping[str, Any]
) -> list[tuple[str, float, float, float]]:
    """``(class, reference IoU %, final IoU %, gain)`` for every class defined in both, sorted by gain (largest
    first; ties keep the protocol order)."""
    rows = [
        (name, 100.0 * before, 100.0 * after, 100.0 * (after - before))
        for name, before, after in zip(
            final["class_names"], reference["per_category_iou"], final["per_category_iou"]
        )
        if before is not None and after is not None and math.isfinite(before) and math.isfinite(after)
    ]
    return sorted(rows, key=lambda row: -row[3])


def per_class_figure(reference: Mapping[str, Any], final: Mapping[str, Any], final_title: str = "adapted"):
    """Paired horizontal bars, the starting point against the exported model, one pair per class of
    :func:`per_class_gains` (largest gain on top)."""
    import numpy as np

    plt = _pyplot()
    rows = per_class_gains(reference, final)
    figure, axes = plt.subplots(figsize=(7.0, 0.28 * max(len(rows), 1) + 1.2), dpi=100)
    positions = np.arange(len(rows))[::-1]
    before = [row[1] for row in rows]
    after = [row[2] for row in rows]
    axes.barh(positions + 0.2, before, height=0.4, label="warm-up", color="#9aa9bd")
    axes.barh(positions - 0.2, after, height=0.4, label=final_title, color="#d1603d")
    axes.set_yticks(positions, [f"{row[0]} ({row[3]:+.1f})" for row in rows], fontsize=8)
    axes.set_xlabel("IoU (%)")
    axes.set_xlim(0, 100)
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def pseudo_label_series(document: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """``{label: [(step, mIoU %), ...]}`` of the logged pseudo-label diagnostics (``logs`` of ``metrics.json``);
    empty when none were logged (no labelled target split, or ``--no_pseudo_label_diagnostics``)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in document.get("logs") or []:
        for key, label in PSEUDO_LABEL_SERIES:
            value = entry.get(key)
            if value is not None and math.isfinite(value):
                series.setdefault(label, []).append((int(entry["step"]), 100.0 * float(value)))
    return series


def pseudo_label_figure(document: Mapping[str, Any]):
    """The pseudo labels' mIoU against the target's ground truth over steps, per kind, stages shaded."""
    return _curves_over_steps(document, pseudo_label_series(document), "pseudo-label mIoU (%)", 3.4)


def write_card_plots(document: Mapping[str, Any], model_dir: str | os.PathLike) -> list[CardPlot]:
    """Draw every figure the record allows into ``model_dir/plots/`` (PNG) and return them in card order.

    The mIoU curve needs at least one evaluation; the per-class bars a starting-point evaluation and a later
    one (:func:`reference_metrics`); the pseudo-label curve logged diagnostics.
    """
    plt = _pyplot()
    folder = Path(model_dir) / PLOTS_DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    figures = []
    if evaluation_series(document):
        figures.append(("miou_over_training.png", "Target mIoU over training", miou_figure(document)))
    reference, final = reference_metrics(document), document.get("final")
    if reference is not None and final is not None and per_class_gains(reference, final):
        stage_titles = {
            stage["name"]: stage.get("title") or stage["name"]
            for stage in (document.get("training") or {}).get("stages") or []
        }
        stage = final.get("stage", "final")
        title = f"{stage_titles.get(stage, stage)} {document.get('exported_model', 'student')}"
        figures.append(
            (
                "per_class_iou.png",
                "Per-class IoU, warm-up against adapted",
                per_class_figure(reference, final, title),
            )
        )
    if pseudo_label_series(document):
        figures.append(
            (
                "pseudo_labels_over_training.png",
                "Pseudo-label quality over training",
                pseudo_label_figure(document),
            )
        )
    plots = []
    for filename, title, figure in figures:
        figure.savefig(folder / filename, bbox_inches="tight")
        plt.close(figure)
        plots.append(CardPlot(f"{PLOTS_DIRNAME}/{filename}", title))
    return plots


__all__ = [
    "PLOTS_DIRNAME",
    "CardPlot",
    "evaluation_series",
    "matplotlib_available",
    "miou_figure",
    "per_class_figure",
    "per_class_gains",
    "pseudo_label_figure",
    "pseudo_label_series",
    "reference_metrics",
    "stage_spans",
    "write_card_plots",
]
