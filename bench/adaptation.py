"""Is it CPSL, or just self-training? Target mIoU of CPSL against the built-in mean-teacher baseline, over seeds.

For every seed, one warm-up (source-only, ``scripts/train.py --cpsl_steps 0``) is shared by every row; each row
then runs the same number of adaptation steps from it (``--model_name_or_path WARMUP --warmup_steps 0``) with
the same seed, so the rows differ only in what the row's flags change:

- ``source_only``: the control, as many more source-only steps (same learning-rate schedule);
- ``mean_teacher``: ``--method mean_teacher`` with the EMA teacher's pseudo labels (the classic mean teacher);
  ``mean_teacher_frozen``: with the frozen warm-up model's (the same ``P_ST`` CPSL rectifies);
- ``cpsl``: the package's defaults (the paper's method); ``cpsl_reference``: the published code's configuration
  (offline ``P_ST``, uniform sampling, static prior, CE + RCE, CutMix, the logits branch, teacher in train mode);
- ablations of ``cpsl``: no rectification, uniform sampling, static prior, uniform prior (Sinkhorn with equal class
  marginals: no class balance), no memory bank, no consistency term;
- the alternative to each choice the defaults make: the EMA teacher's ``P_ST``, the symmetric softmax KL, W in
  AdamW, the signed SegFormer embedding, the reference's EMA momentum 0.999, cutout labels kept, teacher in
  train mode, pseudo labels at the decoder's resolution.

Prints, for student and teacher, target mIoU mean and standard deviation over the seeds, the difference to the
best mean-teacher row, the pseudo-label diagnostics over the adaptation stage (mIoU and pixel accuracy of argmax
``P_ST`` and of the trained pseudo labels against the target training labels) and wall time; then per class the
IoU after the warm-up and after each row (student, seed mean), flagging every class the warm-up knew (IoU >= 10)
that a row drives below half of it.

    python bench/adaptation.py                       # 3 seeds, every row, 300 steps, 2 runs at a time
    python bench/adaptation.py --rows mean_teacher cpsl --seeds 0 --steps 100
    python bench/adaptation.py --row "cpsl_ema99=--ema_momentum 0.99"   # an extra row, any trainer flags
    python bench/adaptation.py --common "--synthetic_variant hard"     # flags for every run, warm-ups too

Runs are cached in ``--output_dir`` (a run whose ``metrics.json`` exists is read, not rerun; ``--force`` reruns),
so an interrupted bench continues where it stopped. Each run is a fresh ``python scripts/train.py`` process
with ``--threads`` torch threads; ``--jobs`` of them run at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPOSITORY / "scripts" / "train.py"

ROWS: dict[str, str] = {
    "source_only": "",  # handled specially: more warm-up steps instead of an adaptation stage
    "mean_teacher": "--method mean_teacher --pseudo_labels teacher --consistency symmetric",
    "mean_teacher_frozen": "--method mean_teacher --pseudo_labels frozen --consistency symmetric",
    "cpsl": "",
    "cpsl_reference": "--pseudo_labels offline --sampling uniform --prior static --target_loss ce+rce "
    "--mix cutmix --mix_prob 0.5 --sl_logits_branch --consistency reference --teacher_mode train "
    "--pseudo_label_resolution decode",
    # ablations of the method's parts
    "no_rectification": "--no_rectification",
    "uniform_sampling": "--sampling uniform",
    "static_prior": "--prior static",
    "uniform_prior": "--prior uniform",
    "no_memory_bank": "--bank_size 0",
    "no_consistency": "--consistency none",
    # the choices the defaults make (each the alternative to one default)
    "teacher_pseudo_labels": "--pseudo_labels teacher",
    "symmetric_consistency": "--consistency symmetric",
    "adamw_prototypes": "--prototype_optimizer adamw",
    "signed_embedding": "--segformer_embedding pre_activation",
    "reference_ema": "--ema_momentum 0.999",
    "cutout_labels_kept": "--cutout_labels keep",
    "teacher_train_mode": "--teacher_mode train",
    "decode_resolution_labels": "--pseudo_label_resolution decode",
}
"""Row name -> trainer flags added to the adaptation run (``source_only`` continues the warm-up instead)."""

BASELINES = ("mean_teacher", "mean_teacher_frozen")
KNOWN_IOU = 0.10  # a class the warm-up "knew"
COLLAPSE_FRACTION = 0.5  # ... and that a row drives below this fraction of its warm-up IoU


def run_training(
    argv: list[str], output_dir: Path, threads: int, force: bool, script: Path = TRAIN_SCRIPT, env_extra=None
) -> dict:
    """``script argv --output_dir output_dir`` (``scripts/train.py`` by default) in a fresh process unless the
    folder holds a finished run (``metrics.json``) of the same flags (``bench_run.json``); a finished run of
    other flags is an error (another ``--output_dir``, or ``--force``), never silently reused."""
    metrics_path, record_path = output_dir / "metrics.json", output_dir / "bench_run.json"
    record = {"script": Path(script).name, "argv": list(argv)}
    if metrics_path.is_file() and not force:
        previous = json.loads(record_path.read_text()) if record_path.is_file() else None
        if previous != record:
            raise RuntimeError(
                f"{output_dir} holds a run of other flags ({previous}, not {record}): use another --output_dir "
                "or --force"
            )
        return json.loads(metrics_path.read_text())
    output_dir.mkdir(parents=True, exist_ok=True)
    record_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "0",
        "PYTHONPATH": str(REPOSITORY),
        **(env_extra or {}),
    }
    command = [
        sys.executable, str(script), *argv, "--output_dir", str(output_dir),
        "--no_progress_bar", "--save_predictions", "0",
    ]  # fmt: skip
    started = time.time()
    with open(output_dir / "train.log", "w") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPOSITORY)
    if result.returncode != 0:
        raise RuntimeError(
            f"run failed ({result.returncode}): {shlex.join(command)}; see {output_dir}/train.log"
        )
    metrics = json.loads(metrics_path.read_text())
    metrics["wall_seconds"] = time.time() - started
    metrics_path.write_text(json.dumps(metrics, indent=2))
    record_path.write_text(json.dumps(record))
    return metrics


def final_results(metrics: dict) -> dict:
    """Student / teacher target metrics at the end of the run's last stage, and the stage's pseudo-label
    diagnostics."""
    stage = metrics["final"]["stage"]
    last = metrics["history"][stage][str(metrics["final"]["step"])]
    return {
        "student": last["student"],
        "teacher": last.get("teacher"),
        "pseudo_labels": metrics.get("pseudo_labels", {}).get(stage),
        "seconds": metrics.get("wall_seconds", metrics["training"]["training_seconds"]),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float], scale: float = 100.0) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{scale * mean:.2f} ± {scale * std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="adaptation (and control) steps per row")
    parser.add_argument("--warmup_steps", type=int, default=1000)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help=f"rows to run, of {list(ROWS)}")
    parser.add_argument("--row", action="append", default=[], help="an extra row NAME=FLAGS")
    parser.add_argument("--common", default="", help="flags for every run, the warm-ups included")
    parser.add_argument("--output_dir", default=str(REPOSITORY / "bench" / "out" / "adaptation"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--force", action="store_true", help="rerun cached runs")
    parser.add_argument("--json", default=None, help="also write every result to this JSON file")
    parser.add_argument(
        "--train_script",
        default=str(TRAIN_SCRIPT),
        help="the entry point of the adaptation runs (scripts/train.py; e.g. a patched copy for an experiment); "
        "its environment gets BENCH_ROW=<row name>",
    )
    options = parser.parse_args()

    rows = {}
    for name in options.rows:
        if name not in ROWS:
            parser.error(f"--rows: unknown row {name!r}; known rows: {', '.join(ROWS)}")
        rows[name] = ROWS[name]
    for spec in options.row:
        name, separator, flags = spec.partition("=")
        if not separator or not name:
            parser.error(f"--row {spec!r}: expected NAME=FLAGS")
        rows[name] = flags
    common = shlex.split(options.common)
    out = Path(options.output_dir)

    def warmup(seed: int) -> dict:
        argv = [
            *common,
            "--seed",
            str(seed),
            "--warmup_steps",
            str(options.warmup_steps),
            "--cpsl_steps",
            "0",
        ]
        return run_training(argv, out / f"warmup_s{seed}", options.threads, False)

    def adapt(item: tuple[str, int]) -> tuple[str, int, dict]:
        name, seed = item
        argv = [*common, "--seed", str(seed), "--model_name_or_path", str(out / f"warmup_s{seed}")]
        if name == "source_only":
            argv += ["--warmup_steps", str(options.steps), "--cpsl_steps", "0"]
        else:
            argv += ["--warmup_steps", "0", "--cpsl_steps", str(options.steps), *shlex.split(rows[name])]
        metrics = run_training(
            argv, out / f"{name}_s{seed}", options.threads, options.force, Path(options.train_script),
            {"BENCH_ROW": name},
        )  # fmt: skip
        return name, seed, final_results(metrics)

    started = time.time()
    with ThreadPoolExecutor(max_workers=options.jobs) as pool:
        warmups = dict(zip(options.seeds, pool.map(warmup, options.seeds)))
        runs = list(pool.map(adapt, [(name, seed) for name in rows for seed in options.seeds]))
    results: dict[str, dict[int, dict]] = {}
    for name, seed, result in runs:
        results.setdefault(name, {})[seed] = result
    warmup_results = {seed: final_results(metrics) for seed, metrics in warmups.items()}

    print(
        f"\n{len(options.seeds)} seeds ({', '.join(map(str, options.seeds))}), {options.warmup_steps} warm-up steps, "
        f"{options.steps} adaptation steps per row, common flags: {options.common or 'none'}; "
        f"bench wall time {time.time() - started:.0f} s\n"
    )
    baseline = {
        name: mean_std([r["student"]["mean_iou"] for r in results[name].values()])[0]
        for name in BASELINES
        if name in results
    }
    best_baseline = max(baseline, key=baseline.get) if baseline else None
    print(
        "| row | student mIoU | teacher mIoU | student - "
        + (best_baseline or "baseline")
        + " | P_ST mIoU / acc | pseudo-label mIoU / acc | labelled share | wall (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    warm = [r["student"]["mean_iou"] for r in warmup_results.values()]
    print(f"| warm-up | {cell(warm)} | | | | | | |")
    for name, by_seed in results.items():
        seeds = sorted(by_seed)
        student = [by_seed[s]["student"]["mean_iou"] for s in seeds]
        teacher = [by_seed[s]["teacher"]["mean_iou"] if by_seed[s]["teacher"] else None for s in seeds]
        gain = "-"
        if best_baseline is not None:
            reference = results[best_baseline]
            diffs = [
                by_seed[s]["student"]["mean_iou"] - reference[s]["student"]["mean_iou"]
                for s in seeds
                if s in reference
            ]
            gain = cell(diffs)
        pseudo = [by_seed[s]["pseudo_labels"] for s in seeds]
        if all(p is not None for p in pseudo):
            p_st = f"{cell([p['p_st']['mean_iou'] for p in pseudo])} / {cell([p['p_st']['pixel_accuracy'] for p in pseudo])}"
            labels = (
                f"{cell([p['pseudo_labels']['mean_iou'] for p in pseudo])} / "
                f"{cell([p['pseudo_labels']['pixel_accuracy'] for p in pseudo])}"
            )
            share = cell([p["pseudo_labels"]["pixels"] / max(p["p_st"]["pixels"], 1) for p in pseudo])
        else:
            p_st = labels = share = "-"
        seconds = statistics.fmean(by_seed[s]["seconds"] for s in seeds)
        print(
            f"| {name} | {cell(student)} | {cell(teacher)} | {gain} | {p_st} | {labels} | {share} | {seconds:.0f} |"
        )

    # Per class: warm-up and each row's student, seed means; collapse flags.
    names = next(iter(warmup_results.values()))["student"]["class_names"]
    print(
        "\nPer-class target IoU (%), student, mean over seeds; ↓ marks a class the warm-up knew "
        f"(IoU >= {100 * KNOWN_IOU:.0f}) that the row drives below {COLLAPSE_FRACTION:.0%} of it.\n"
    )
    print("| class | warm-up | " + " | ".join(results) + " |")
    print("|---|---:|" + "---:|" * len(results))
    collapses: dict[str, list[str]] = {name: [] for name in results}

    def class_mean(per_seed: list[dict], index: int) -> float:
        return mean_std([r["student"]["per_category_iou"][index] for r in per_seed])[0]

    for index, class_name in enumerate(names):
        warm_iou = class_mean(list(warmup_results.values()), index)
        cells = []
        for name, by_seed in results.items():
            value = class_mean(list(by_seed.values()), index)
            flag = ""
            if warm_iou >= KNOWN_IOU and value < COLLAPSE_FRACTION * warm_iou:
                flag = " ↓"
                collapses[name].append(class_name)
            cells.append("-" if math.isnan(value) else f"{100 * value:.1f}{flag}")
        print(f"| {class_name} | {100 * warm_iou:.1f} | " + " | ".join(cells) + " |")

    # Per class pseudo-label IoU over the stage (mean over seeds): argmax P_ST and the trained labels.
    pseudo_rows = [
        name for name, by_seed in results.items() if all(r["pseudo_labels"] for r in by_seed.values())
    ]
    if pseudo_rows:
        print(
            "\nPer-class pseudo-label IoU (%) against the target training labels over the adaptation stage, "
            "mean over seeds: argmax P_ST -> trained labels.\n"
        )
        print("| class | " + " | ".join(pseudo_rows) + " |")
        print("|---|" + "---:|" * len(pseudo_rows))
        for index, class_name in enumerate(names):
            cells = []
            for name in pseudo_rows:
                per_seed = list(results[name].values())
                before = mean_std([r["pseudo_labels"]["p_st"]["per_category_iou"][index] for r in per_seed])[
                    0
                ]
                after = mean_std(
                    [r["pseudo_labels"]["pseudo_labels"]["per_category_iou"][index] for r in per_seed]
                )[0]
                cells.append("-" if math.isnan(before) else f"{100 * before:.1f} -> {100 * after:.1f}")
            print(f"| {class_name} | " + " | ".join(cells) + " |")

    print("\nCollapsed classes (warm-up IoU >= 10, below half of it after the row):")
    for name, classes in collapses.items():
        print(f"- {name}: {', '.join(classes) if classes else 'none'}")

    if options.json:
        Path(options.json).write_text(
            json.dumps(
                {
                    "warmup": warmup_results,
                    "rows": {n: {str(s): r for s, r in v.items()} for n, v in results.items()},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
