"""Evaluation speed: images/s of computing the mIoU of one set of predictions, by ours and by the references.

The same generated Cityscapes-size prediction / label pairs (2048x1024, 19 classes, ignore 255, fixed seed)
are evaluated by:

- **ours**: :class:`cpsl_hf.evaluation.ConfusionMatrix` as ``scripts/evaluate.py`` drives it
  (``evaluate_model``: one ``ConfusionMatrix(19, device=...)``, ``update(logits, labels)`` per batch of one,
  then ``reduce().compute()``), twice: fed the model's logits at 1/4 resolution (what a SegFormer gives
  ``scripts/evaluate.py``; the bilinear upsampling to label size and the argmax are inside ``update``), and
  fed the predicted class-id maps (what the references below take);
- **cityscapesscripts**: the official ``evalPixelLevelSemanticLabeling`` run the way its instructions say
  (``CITYSCAPES_DATASET`` / ``CITYSCAPES_RESULTS`` set, ``main()`` with no arguments: it globs
  ``gtFine/val/*/*_gtFine_labelIds.png`` and finds each prediction PNG, label ids, in the results folder),
  on PNGs written to a temporary folder first (that writing is not timed; it is printed apart). Only the
  pixel-level mIoU is asked for: ``evalInstLevelScore`` off (no ``instanceIds`` files), quiet. The bench says
  whether its Cython ``addToConfusionMatrix`` fast path was used;
- **evaluate ``mean_iou``**: Hugging Face ``evaluate``'s Hub metric (``evaluate.load("mean_iou")``, or a local
  copy of its folder with ``--mean-iou-path``). It needs the Hub (or ``evaluate``'s module cache): offline it is
  skipped, and said so;
- **evaluate ``cpsl_mean_iou``**: our vendored ``evaluate`` module (``cpsl_hf/metrics/cpsl_mean_iou``) through
  ``evaluate.load(<local folder>)``: ``evaluate``'s Arrow round trip of the maps, then our confusion matrix.

Every evaluator's mIoU must equal ours to 1e-6 (:func:`check_agreement`); otherwise no speed is printed and the
bench exits non-zero. A reference that is not installed (or cannot load) is skipped, and the bench prints
which and why. Inputs are made before each timer starts (for ``--device cuda`` they are already on the GPU,
as logits are in ``scripts/evaluate.py``); evaluator loading (``evaluate.load``, imports) is not timed.

    python bench/bench_eval.py [--images 20] [--device cpu|cuda] [--quick] [--threads N]
        [--mean-iou-path FOLDER]

``--quick``: 3 images at 256x512 (the test's smoke run). Numbers are for this machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cpsl_hf.data import protocols, testing
from cpsl_hf.evaluation import ConfusionMatrix, metric_module_path

NUM_CLASSES = 19
IGNORE_INDEX = protocols.IGNORE_INDEX
FULL_SIZE = (1024, 2048)  # Cityscapes H x W
QUICK_SIZE = (256, 512)
QUICK_IMAGES = 3
DEFAULT_IMAGES = 20
TOLERANCE = 1e-6
LOGIT_STRIDE = 4  # SegFormer's output stride: logits at 1/4 of the input size

# Rough Cityscapes class frequencies (train-id order), so that the maps look like street scenes.
CLASS_FREQUENCY = np.array(
    [36.9, 6.1, 22.8, 0.7, 0.9, 1.2, 0.2, 0.6, 15.9, 1.2, 4.0, 1.2, 0.1, 7.0, 0.3, 0.2, 0.2, 0.1, 0.4]
)


class DisagreementError(RuntimeError):
    """The evaluators' mIoUs differ by more than the tolerance (or one is not a finite number)."""


def check_agreement(values: dict[str, float], tolerance: float = TOLERANCE) -> float:
    """Check that the mIoUs of ``values`` (evaluator name -> mIoU) agree within ``tolerance``.

    Returns:
        the largest difference between two of them.

    Raises:
        ValueError: ``values`` is empty.
        DisagreementError: a value is NaN or infinite, or two differ by more than ``tolerance``.
    """
    if not values:
        raise ValueError("check_agreement: no mIoU to compare")
    listing = ", ".join(f"{name}: {value!r}" for name, value in values.items())
    not_finite = [name for name, value in values.items() if not math.isfinite(value)]
    if not_finite:
        raise DisagreementError(f"mIoU is not a finite number for {', '.join(not_finite)} ({listing})")
    spread = max(values.values()) - min(values.values())
    if spread > tolerance:
        raise DisagreementError(
            f"the evaluators disagree on the mIoU by {spread:.3g} > {tolerance:g}: {listing}"
        )
    return spread


@dataclass
class Pairs:
    """The benchmark's data: low-resolution logits, their predicted class ids at label size, the labels."""

    logits: list[torch.Tensor]  # 1 x C x H/4 x W/4 float32, on the benchmark device
    predictions: list[np.ndarray]  # H x W uint8 train ids 0..C-1 (argmax of the upsampled logits)
    labels: list[np.ndarray]  # H x W uint8 train ids, IGNORE_INDEX where unlabelled
    height: int
    width: int
    ignored_fraction: float = field(default=0.0)


def _blocky(rng: np.random.Generator, height: int, width: int, cell: int, weights: np.ndarray) -> np.ndarray:
    coarse = rng.choice(len(weights), size=(-(-height // cell), -(-width // cell)), p=weights)
    return np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:height, :width]


def street_label(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A structured label map: sky / building / road bands, blocky regions, a few objects, ignored parts."""
    weights = CLASS_FREQUENCY / CLASS_FREQUENCY.sum()
    cell = max(height // 32, 4)
    label = _blocky(rng, height, width, cell, weights).astype(np.uint8)
    rows = np.arange(height)[:, None]
    label = np.where(rows < height * rng.uniform(0.15, 0.3), np.uint8(10), label)  # sky band
    label = np.where(rows > height * rng.uniform(0.65, 0.75), np.uint8(0), label)  # road band
    for _ in range(int(rng.integers(8, 20))):  # objects: cars, people, poles, signs ...
        h, w = int(rng.integers(height // 40, height // 6)), int(rng.integers(width // 80, width // 8))
        top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        label[top : top + h, left : left + w] = rng.choice([5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18])
    label[int(height * rng.uniform(0.85, 0.92)) :] = IGNORE_INDEX  # the ego vehicle
    unlabelled = _blocky(rng, height, width, max(cell // 2, 2), np.array([0.97, 0.03])).astype(bool)
    label[unlabelled] = IGNORE_INDEX  # scattered void regions
    return label


def noisy_logits(rng: np.random.Generator, label: np.ndarray, stride: int) -> torch.Tensor:
    """1 x C x H/stride x W/stride logits of a mostly-right model: the label's class scores highest, plus
    noise, some regions confused with another class; ignored pixels get some class too."""
    small = label[stride // 2 :: stride, stride // 2 :: stride].astype(np.int64)
    height, width = small.shape
    target = np.where(small == IGNORE_INDEX, rng.integers(0, NUM_CLASSES, size=small.shape), small)
    confused = _blocky(rng, height, width, 8, np.array([0.85, 0.15])).astype(bool)
    target = np.where(confused, rng.integers(0, NUM_CLASSES, size=small.shape), target)
    logits = rng.normal(0.0, 1.0, size=(NUM_CLASSES, height, width)).astype(np.float32)
    np.put_along_axis(logits, target[None], np.take_along_axis(logits, target[None], 0) + 3.0, 0)
    return torch.from_numpy(logits)[None]


def upsampled_argmax(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """What ``ConfusionMatrix.update`` does with logits: bilinear (``align_corners=False``) to the label
    size, argmax over the classes."""
    return F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False).argmax(1)


def make_pairs(count: int, height: int, width: int, device: torch.device, seed: int = 0) -> Pairs:
    rng = np.random.default_rng(seed)
    logits, predictions, labels = [], [], []
    for _ in range(count):
        label = street_label(rng, height, width)
        image_logits = noisy_logits(rng, label, LOGIT_STRIDE).to(device)
        logits.append(image_logits)
        predictions.append(upsampled_argmax(image_logits, height, width)[0].cpu().numpy().astype(np.uint8))
        labels.append(label)
    ignored = float(np.mean([np.mean(label == IGNORE_INDEX) for label in labels]))
    return Pairs(logits, predictions, labels, height, width, ignored)


@dataclass
class Result:
    name: str
    seconds: float
    mean_iou: float
    note: str = ""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ids(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array).long()[None].to(device)


def run_ours(pairs: Pairs, device: torch.device, feed: str) -> Result:
    """``ConfusionMatrix`` as ``evaluate_model`` drives it; ``feed``: "logits" or "ids". Only the
    ``update`` calls and ``reduce().compute()`` are timed, after one untimed warm-up update."""
    warm_up = ConfusionMatrix(NUM_CLASSES, device=device)  # first-call costs (allocator, kernels): untimed
    warm_up.update(
        pairs.logits[0] if feed == "logits" else _ids(pairs.predictions[0], device),
        _ids(pairs.labels[0], device),
    )
    warm_up.compute()
    confusion = ConfusionMatrix(NUM_CLASSES, device=device)
    seconds = 0.0
    for logits, prediction, label in zip(pairs.logits, pairs.predictions, pairs.labels):
        labels = _ids(label, device)  # the eval loader's int64 N x H x W
        inputs = logits if feed == "logits" else _ids(prediction, device)
        _synchronize(device)
        start = time.perf_counter()
        confusion.update(inputs, labels)
        _synchronize(device)
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    metrics = confusion.reduce().compute()
    seconds += time.perf_counter() - start
    if feed == "logits":
        name = "ours: ConfusionMatrix, logits at 1/4 size (as scripts/evaluate.py)"
    else:
        name = "ours: ConfusionMatrix, class-id maps"
    return Result(name, seconds, metrics["mean_iou"])


class Skipped(Exception):
    """A reference evaluator that cannot run here (not installed, cannot load); the message says why."""


def write_cityscapes_files(pairs: Pairs, root: Path) -> None:
    """``root/gtFine/val/bench/*_gtFine_labelIds.png`` and ``root/results/*_pred.png``, both label ids."""
    to_label_id = protocols.train_id_to_label_id(NUM_CLASSES)  # 255 -> 0 "unlabeled" (ignored in eval)
    ground_truth = root / "gtFine" / "val" / "bench"
    results = root / "results"
    ground_truth.mkdir(parents=True)
    results.mkdir()
    for index, (prediction, label) in enumerate(zip(pairs.predictions, pairs.labels)):
        stem = testing.cityscapes_stem("bench", index)
        Image.fromarray(to_label_id[label]).save(ground_truth / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(to_label_id[prediction]).save(results / f"{stem}_pred.png")


def run_cityscapes(pairs: Pairs, workdir: Path) -> tuple[Result, float]:
    """The official evaluator on PNG files; returns its result and the (untimed) seconds spent writing them."""
    root = workdir / "cityscapes"
    start = time.perf_counter()
    write_cityscapes_files(pairs, root)
    writing = time.perf_counter() - start
    # its module reads these when imported (paths) and in main() (results folder)
    os.environ["CITYSCAPES_DATASET"] = str(root)
    os.environ["CITYSCAPES_RESULTS"] = str(root / "results")
    os.environ["CITYSCAPES_EXPORT_DIR"] = str(root / "export")
    (root / "export").mkdir()  # checked when the module is imported
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    except ImportError as error:
        raise Skipped(
            f"cityscapesscripts is not installed ({error}); pip install cityscapesscripts"
        ) from error
    args = official.args  # the module's global settings object; set as the env vars would at import
    args.cityscapesPath = str(root)
    args.groundTruthSearch = os.path.join(str(root), "gtFine", "val", "*", "*_gtFine_labelIds.png")
    args.exportFile = str(root / "export" / "resultPixelLevelSemanticLabeling.json")
    args.predictionPath = None
    args.predictionWalk = None
    args.evalInstLevelScore = False  # the instance-weighted iIoU needs instanceIds files; we want the mIoU
    args.quiet = True
    args.colorized = False
    fast_path = bool(official.CSUPPORT)
    saved_argv = sys.argv
    sys.argv = [saved_argv[0]]  # main() with no arguments: glob the ground truth, find the predictions
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            start = time.perf_counter()
            official.main()
            seconds = time.perf_counter() - start
    except SystemExit as error:  # its printError() exits
        raise RuntimeError(f"cityscapesscripts failed: {printed.getvalue().strip()}") from error
    finally:
        sys.argv = saved_argv
    result = json.loads(Path(args.exportFile).read_text())
    counted = int(np.asarray(result["confMatrix"], dtype=np.int64).sum())
    expected = len(pairs.labels) * pairs.height * pairs.width
    if counted != expected:  # it must have found and read every pair
        raise RuntimeError(f"cityscapesscripts counted {counted} pixels, expected {expected}")
    note = (
        "Cython addToConfusionMatrix used"
        if fast_path
        else "pure-Python path (no compiled addToConfusionMatrix)"
    )
    name = "cityscapesscripts evalPixelLevelSemanticLabeling (PNG files)"
    return Result(name, seconds, float(result["averageScoreClasses"]), note), writing


def _compute_evaluate_metric(metric, pairs: Pairs) -> tuple[float, float]:
    start = time.perf_counter()
    results = metric.compute(
        predictions=pairs.predictions,
        references=pairs.labels,
        num_labels=NUM_CLASSES,
        ignore_index=IGNORE_INDEX,
        reduce_labels=False,
    )
    return time.perf_counter() - start, float(results["mean_iou"])


def _import_evaluate():
    try:
        import evaluate
    except ImportError as error:
        raise Skipped(f"evaluate is not installed ({error}); pip install evaluate") from error
    return evaluate


def run_hub_mean_iou(pairs: Pairs, path: str | None) -> Result:
    """``evaluate``'s Hub ``mean_iou`` (or its folder at ``path``)."""
    evaluate = _import_evaluate()
    source = path or "mean_iou"
    try:
        metric = evaluate.load(source)
    except Exception as error:  # offline: FileNotFoundError; others for a broken cache or folder
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        reason = f"evaluate.load({source!r}) failed: {type(error).__name__}: {str(error).splitlines()[0]}"
        if offline and path is None:
            reason += (
                " (HF_HUB_OFFLINE is set and the metric is not in evaluate's module cache: it lives on the "
                "Hub, not in the pip package; pass --mean-iou-path with a local copy of its folder)"
            )
        raise Skipped(reason) from error
    seconds, mean_iou = _compute_evaluate_metric(metric, pairs)
    where = "Hub" if path is None else path
    return Result(f"evaluate mean_iou ({where})", seconds, mean_iou)


def run_cpsl_mean_iou(pairs: Pairs) -> Result:
    """Our vendored ``evaluate`` module through ``evaluate.load(<local folder>)``."""
    evaluate = _import_evaluate()
    metric = evaluate.load(metric_module_path())
    seconds, mean_iou = _compute_evaluate_metric(metric, pairs)
    return Result(
        "evaluate cpsl_mean_iou (our vendored module, evaluate.load(local folder))", seconds, mean_iou
    )


def format_table(results: list[Result], num_images: int) -> str:
    baseline = next(result for result in results if result.name.startswith("ours: ConfusionMatrix, class-id"))
    baseline_rate = num_images / baseline.seconds

    lines = [
        "| evaluator | images/s | seconds total | ratio to ours (class ids) | mIoU |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        rate = num_images / result.seconds
        name = f"{result.name}; {result.note}" if result.note else result.name
        lines.append(
            f"| {name} | {rate:.2f} | {result.seconds:.3f} | {rate / baseline_rate:.3f} | {result.mean_iou:.8f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help=f"image pairs (default {DEFAULT_IMAGES}; --quick: {QUICK_IMAGES})",
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where ours runs (default cpu)"
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images at 256x512 (smoke test)")
    parser.add_argument(
        "--mean-iou-path",
        default=None,
        help="local folder of evaluate's Hub mean_iou metric (for offline use)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for ours (default: torch's default)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    args = parser.parse_args(argv)
    if args.images is None:
        args.images = QUICK_IMAGES if args.quick else DEFAULT_IMAGES
    if args.images < 1:
        parser.error("--images must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    height, width = QUICK_SIZE if args.quick else FULL_SIZE
    print(
        f"bench_eval: {args.images} prediction/label pairs {width}x{height}, {NUM_CLASSES} classes, "
        f"ignore {IGNORE_INDEX}, seed {args.seed}; ours on {device}, torch threads {torch.get_num_threads()}"
    )
    pairs = make_pairs(args.images, height, width, device, args.seed)
    print(f"data: {100 * pairs.ignored_fraction:.1f}% of the label pixels are ignore ({IGNORE_INDEX})")

    results = [run_ours(pairs, device, "logits"), run_ours(pairs, device, "ids")]
    skipped: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as workdir:
        try:
            result, writing = run_cityscapes(pairs, Path(workdir))
            results.append(result)
            print(
                f"cityscapesscripts: wrote {2 * args.images} label-id PNGs in {writing:.2f} s (not timed); "
                f"{result.note}"
            )
        except Skipped as reason:
            skipped.append(("cityscapesscripts", str(reason)))
    for name, runner in (
        ("evaluate mean_iou", lambda: run_hub_mean_iou(pairs, args.mean_iou_path)),
        ("evaluate cpsl_mean_iou", lambda: run_cpsl_mean_iou(pairs)),
    ):
        try:
            results.append(runner())
        except Skipped as reason:
            skipped.append((name, str(reason)))
    for name, reason in skipped:
        print(f"skipped: {name}: {reason}")

    print("mIoU agreement check (tolerance 1e-6):")
    for result in results:
        print(f"  {result.mean_iou:.10f}  {result.name}")
    try:
        spread = check_agreement({result.name: result.mean_iou for result in results})
    except DisagreementError as error:
        print(f"mIoU agreement check FAILED: {error}; no speeds printed", file=sys.stderr)
        return 1
    print(f"mIoU agreement check passed: {len(results)} evaluators agree within {spread:.2g}")
    print()
    print(format_table(results, args.images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
