"""Seconds per CPSL training step vs a plain mean-teacher self-training step, as a ratio in one run.

Both are the trainer's own adaptation stages (:class:`CPSLStage`, :class:`MeanTeacherStage`, built from the
public stage classes and started as a run starts them), stepped as the loop steps them, on the same batch, with
the same views (source crop; target weak view -> EMA teacher and the frozen ``P_ST`` model; target strong view ->
student), the same backward / optimizer / EMA update, switched by ``--method``:

- mean teacher (``--method mean_teacher --consistency symmetric``): labels ``argmax P_ST`` warped onto the
  strong view, target CE, symmetric-KL consistency of the segmentation softmax; no self-labeling core.
- CPSL (the defaults): rectification, class-balanced sampling, Sinkhorn on bank + batch, ``L_SL``, prior update,
  the self-labeling head's consistency KL to ``W'``, W's own SGD step.

The share of the CPSL step spent inside the self-labeling core (``SelfLabeling.forward``) is measured by
timing that call in the same steps. On a GPU every timed region is closed by ``torch.cuda.synchronize``.

    python bench/train_step.py                  # CPU: the demo preset (segformer-tiny, 128 x 128, batch 8 + 8)
    python bench/train_step.py --gpu            # GPU: the rows of GPU_ROWS (under 5 minutes on an H100 / H200)
    python bench/train_step.py --dry_run        # the --gpu code path on the CPU at tiny sizes (DRY_RUN_ROWS)
    python bench/train_step.py --dry_run --compile   # ... with the torch.compile rows too

The GPU section prints the GPU's name, the torch / CUDA / cuDNN / transformers versions and one row per model and
precision: ``segformer-b5`` 512x512 batch 2+2 and ``deeplabv2-r101`` 896x512 batch 4+4, each in fp32 (TF32
matmuls and cuDNN convolutions allowed, ``--allow_tf32 true``), bf16 autocast, and bf16 + ``torch.compile``
(``--torch_compile true``); then :data:`LATER_GPU_ROWS`: ``dinov2-large`` 512x512 batch 2+2 (fp32, bf16, bf16 with
``--gradient_checkpointing``) and ``dinov3-vitl16`` (bf16), with ``--layer_decay 0.9``. Columns:
seconds per step of both stages and their ratio, images per second (source + target images of a step / seconds),
peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each row's timed rounds; '-' on the CPU), the
FLOPs of one CPSL step and the model FLOPs utilisation (MFU).

FLOPs: one extra, untimed CPSL step (forward, losses and backward; the optimisers and EMA add no matmul) is run
on the real device under ``torch.utils.flop_counter.FlopCounterMode`` after the warm-up. It counts the matmul,
convolution and attention FLOPs (2 per multiply-add) of every forward (EMA teacher, frozen ``P_ST`` model,
student, self-labeling core) and of the backward; elementwise ops, norms and softmax are not counted (the usual
"model FLOPs"). It is counted in the first (eager, fp32) row of each model and size, and reused by its bf16 and
compile rows: autocast changes no FLOP count, and the counter does not see inside compiled graphs. MFU = FLOPs
per CPSL step / seconds per CPSL step / the GPU's dense peak for the precision (:data:`PEAK_TFLOPS`: bf16 dense
for the bf16 rows, TF32 dense for fp32); '-' on a GPU that table does not know (a note says so) and on the CPU.

The deeplabv2 rows are compared with :data:`REFERENCE_RECIPE`, the published CPSL code's speed, as images per
second per GPU.

Prints Markdown tables (paste into BENCHMARKS.md with the hardware line).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpsl_hf.training.arguments import parse_args  # noqa: E402
from cpsl_hf.training.loop import Trainer  # noqa: E402
from cpsl_hf.training.stages import CPSLStage, MeanTeacherStage  # noqa: E402

# ------------------------------------------------------------------ reference numbers
REFERENCE_RECIPE = {
    "source": "CPSL paper's code, 4 GPUs, fp32, 5.15 s/iteration",
    "seconds_per_iteration": 5.15,
    "gpus": 4,
    "images_per_iteration": 8,  # batch 4 source + 4 target, deeplabv2-r101
}
"""The published reference recipe's speed (DeepLab-V2 ResNet-101, fp32), for the deeplabv2 rows."""


def reference_images_per_second_per_gpu(reference: dict = REFERENCE_RECIPE) -> float:
    """Images per second per GPU of ``reference``: 8 / 5.15 / 4 = 0.388 for the CPSL paper's code."""
    return reference["images_per_iteration"] / reference["seconds_per_iteration"] / reference["gpus"]


PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # Dense (no structured sparsity) tensor-core peaks from the vendor datasheets, TFLOP/s.
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7},
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0},
    "H200": {"bf16": 989.4, "tf32": 494.7},  # H200 SXM: the H100 SXM's tensor cores
    "A100 80GB": {"bf16": 312.0, "tf32": 156.0},
    "A100 40GB": {"bf16": 312.0, "tf32": 156.0},
    "L40S": {"bf16": 362.05, "tf32": 183.0},
    "RTX 4090": {"bf16": 165.2, "tf32": 82.6},  # with FP32 accumulate (Ada whitepaper)
}
"""Dense peak TFLOP/s per GPU and precision (``bf16``, ``tf32``)."""

GPU_NAME_PATTERNS: list[tuple[str, str]] = [
    # ``torch.cuda.get_device_name()`` -> a PEAK_TFLOPS key; first match wins. NVL and other variants whose
    # peaks differ match nothing (MFU '-').
    (r"H100.*PCIe", "H100 PCIe"),
    (r"H100.*(SXM|HBM3)", "H100 SXM"),  # the SXM5 part reports itself as "NVIDIA H100 80GB HBM3"
    (r"H200(?!.*NVL)", "H200"),  # also GH200 (the same dense peaks)
    (r"A100.*80GB", "A100 80GB"),
    (r"A100.*40GB", "A100 40GB"),
    (r"L40S", "L40S"),
    (r"RTX 4090", "RTX 4090"),
]

PEAK_PRECISION = {"fp32": "tf32", "bf16": "bf16", "bf16+compile": "bf16"}
"""The tensor-core precision whose peak an MFU of each row's precision is measured against."""


def known_gpu(name: str | None) -> str | None:
    """The :data:`PEAK_TFLOPS` key of a device name, or None."""
    if not name:
        return None
    return next((key for pattern, key in GPU_NAME_PATTERNS if re.search(pattern, name)), None)


def peak_flops(gpu_name: str | None, precision: str) -> float | None:
    """Dense peak FLOP/s of ``gpu_name`` for a row's ``precision`` (``fp32`` -> TF32), or None when unknown."""
    key = known_gpu(gpu_name)
    if key is None:
        return None
    return PEAK_TFLOPS[key][PEAK_PRECISION[precision]] * 1e12


def model_flops_utilisation(flops: float | None, seconds: float, peak: float | None) -> float | None:
    """``flops`` per step / ``seconds`` per step / ``peak`` FLOP/s (a fraction), or None without a peak."""
    if flops is None or peak is None or not seconds > 0:
        return None
    return flops / seconds / peak


# ------------------------------------------------------------------ the rows
@dataclasses.dataclass
class Row:
    """One measured configuration. ``backbone`` is a preset name or a folder (``--backbone``)."""

    label: str
    backbone: str
    crop: tuple[int, int]  # H, W
    image_size: tuple[int, int]  # H, W of the timed batch's images, which the views rescale and crop
    batch: int  # source images = target images per step
    precision: str  # fp32 | bf16 | bf16+compile
    extra: tuple[str, ...] = ()
    reference: bool = False  # compare with REFERENCE_RECIPE (the deeplabv2 rows)

    def argv(self) -> list[str]:
        """Trainer flags of the row's precision (``parse_args`` form)."""
        mixed = "no" if self.precision == "fp32" else "bf16"
        flags = ["--mixed_precision", mixed, "--allow_tf32", "true"]
        if self.precision.endswith("+compile"):
            flags += ["--torch_compile", "true"]
        return flags + list(self.extra)


def model_rows(label, backbone, crop, image_size, batch, precisions, extra=(), reference=False) -> list[Row]:
    return [Row(label, backbone, crop, image_size, batch, p, tuple(extra), reference) for p in precisions]


GPU_PRECISIONS = ("fp32", "bf16", "bf16+compile")
GPU_ROWS: list[Row] = [
    *model_rows("segformer-b5", "segformer-b5", (512, 512), (512, 1024), 2, GPU_PRECISIONS),
    *model_rows(
        "deeplabv2-r101", "deeplabv2-r101", (512, 896), (1024, 2048), 4, GPU_PRECISIONS, reference=True
    ),
]
"""The ``--gpu`` rows."""

_VIT_L_FLAGS = ("--layer_decay", "0.9")
LATER_GPU_ROWS: list[Row] = [
    *model_rows("dinov2-large", "dinov2-large", (512, 512), (512, 1024), 2, ("fp32", "bf16"), _VIT_L_FLAGS),
    *model_rows(
        "dinov2-large ckpt", "dinov2-large", (512, 512), (512, 1024), 2, ("bf16",),
        (*_VIT_L_FLAGS, "--gradient_checkpointing"),
    ),
    *model_rows("dinov3-vitl16", "dinov3-vitl16", (512, 512), (512, 1024), 2, ("bf16",), _VIT_L_FLAGS),
]  # fmt: skip
"""The ViT-L rows (the recipes of configs/gta5_cityscapes_dinov2_large.yaml and ..._dinov3_vitl16.yaml at random
weights, with and without activation checkpointing), measured after :data:`GPU_ROWS` by ``--gpu``: their peak
memory checks the meta-device estimate of ``bench/memory.py`` (README: which config for which GPU)."""

CPU_ROWS: list[Row] = [Row("segformer-tiny (demo)", "segformer-tiny", (128, 128), (128, 256), 8, "fp32")]
"""The default section (no flag): the CPU demo preset."""

TINY_RESNET = {
    "embedding_size": 8,
    "hidden_sizes": [16, 32, 64, 128],
    "depths": [1, 1, 1, 1],
    "layer_type": "bottleneck",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False,
}
"""``--dry_run``'s DeepLab-V2: the ``deeplabv2-r101`` layout (bottlenecks, output stride 8, ProDA ASPP head) with
one block per stage and narrow widths, saved as a random ``ResNetModel`` folder (there is no tiny preset)."""


def dry_run_rows(compile_rows: bool) -> list[Row]:
    precisions = ("fp32", "bf16") + (("bf16+compile",) if compile_rows else ())
    resnet = _tiny_resnet_folder()
    return [
        *model_rows("segformer-tiny (dry run)", "segformer-tiny", (64, 64), (64, 64), 1, precisions),
        *model_rows(
            "deeplabv2-tiny (dry run)", resnet, (64, 64), (64, 64), 1, precisions,
            extra=("--embedding_dim", "32"), reference=True,
        ),
    ]  # fmt: skip


def _tiny_resnet_folder() -> str:
    from transformers import ResNetConfig, ResNetModel

    folder = tempfile.mkdtemp(prefix="cpsl_bench_resnet_")
    torch.manual_seed(0)
    ResNetModel(ResNetConfig(**TINY_RESNET)).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ measuring
def random_batch(batch_size: int, image_size, num_classes: int, device) -> dict:
    """uint8 images and labels drawn from a fixed seed: the same batch for every timed step."""
    height, width = image_size
    generator = torch.Generator().manual_seed(batch_size)
    images = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size, height, width), generator=generator)
    return {"pixel_values": images.to(device), "labels": labels.to(device), "name": [""] * batch_size}


def build_stages(argv: list[str]) -> tuple[Trainer, dict]:
    """A set-up run (model, optimisers, views; a synthetic set of one batch) and its two adaptation stages, built
    from the public stage classes and started as the run would start them (teacher and frozen ``P_ST`` copies;
    for CPSL the prototype and prior pass over the target set)."""
    from accelerate.state import AcceleratorState

    # One process-wide Accelerate state whose mixed precision cannot change: each row starts without one.
    AcceleratorState._reset_state(reset_partial_state=False)
    args = parse_args(argv)
    trainer = Trainer(args)
    trainer.setup()
    training = args.training
    mean_teacher_args = dataclasses.replace(args.cpsl, method="mean_teacher", consistency="symmetric")
    stages = {
        "mean_teacher": MeanTeacherStage(mean_teacher_args, 1, 1.0, training.export_model, False),
        "cpsl": CPSLStage(args.cpsl, 1, 1.0, training.export_model, False),
    }
    for stage in stages.values():
        stage.setup(trainer)
        stage.start(trainer.stages[0])
        stage.started = True
    return trainer, stages


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass
class Result:
    plain_s: float
    cpsl_s: float
    core_share: float
    images: int  # source + target images per step
    peak_gib: float | None  # None on the CPU
    flops: float | None  # of one CPSL step (forward + backward)


def measure(
    row: Row, steps: int, warmup: int, rounds: int = 3, bank_size: int = 65536, flops: float | None = None
) -> Result:
    """Time ``rounds`` interleaved rounds of ``steps`` steps of each stage after ``warmup`` steps of each; count
    the FLOPs of one CPSL step unless ``flops`` is given (the count of the same model and size in another
    precision: autocast and compilation change no FLOP count). A compile row is never counted itself: without an
    eager row of its model before it, its FLOPs and MFU are '-'."""
    cache_dir = tempfile.mkdtemp(prefix="cpsl_bench_data_")
    crop, image_size, batch = row.crop, row.image_size, row.batch
    argv = [
        "--backbone", row.backbone, "--crop_size", str(crop[0]), str(crop[1]),
        "--source_batch_size", str(batch), "--target_batch_size", str(batch), "--bank_size", str(bank_size),
        "--output_dir", tempfile.mkdtemp(prefix="cpsl_bench_run_"), "--no_progress_bar", "--optimizer", "adamw",
        "--synthetic_image_size", str(crop[0]), str(crop[1]),  # the timed batch is random_batch's, at image_size
        "--synthetic_train_images", str(batch), "--synthetic_val_images", "1", "--synthetic_cache_dir", cache_dir,
        "--warmup_steps", "0", "--no_pseudo_label_diagnostics", "--eval_batch_size", "1", *row.argv(),
    ]  # fmt: skip
    trainer, stages = build_stages(argv)
    device = trainer.device
    source = random_batch(batch, image_size, trainer.num_classes, device)
    target = random_batch(batch, image_size, trainer.num_classes, device)
    target.pop("labels")  # the loop takes the ground truth out before a stage sees the batch
    core_seconds = []
    core = stages["cpsl"].self_labeling
    original_forward = core.forward

    def timed_forward(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = original_forward(*args, **kwargs)
        _sync(device)
        core_seconds.append(time.perf_counter() - start)
        return out

    core.forward = timed_forward
    plain_losses, cpsl_losses = stages["mean_teacher"], stages["cpsl"]

    def step(stage):
        """One optimisation step of ``stage``, as the loop takes it (losses, backward, optimisers, EMA)."""
        output = stage.losses(source, target)
        trainer.accelerator.backward(output.losses["loss"])
        for optimizer in trainer.optimizers():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        stage.after_step()

    def time_steps(losses_fn):
        times = []
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            step(losses_fn)
            _sync(device)
            times.append(time.perf_counter() - start)
        return times

    trainer.model.train()
    for _ in range(warmup):
        step(plain_losses)
        step(cpsl_losses)
    if flops is None and not row.precision.endswith("+compile"):  # a compiled step is not counted (docstring)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step(cpsl_losses)
        flops = float(counter.get_total_flops())
    core_seconds.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Interleave rounds of both so load changes on a shared machine hit both alike.
    plain, cpsl = [], []
    for _ in range(rounds):
        plain += time_steps(plain_losses)
        cpsl += time_steps(cpsl_losses)
    plain_s, cpsl_s = statistics.median(plain), statistics.median(cpsl)
    core_share = statistics.median(core_seconds) / cpsl_s
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if trainer.folder_lock is not None:  # Trainer.train() would release it
        trainer.folder_lock.release()
    return Result(plain_s, cpsl_s, core_share, 2 * batch, peak, flops)


# ------------------------------------------------------------------ printing
TABLE_HEADER = (
    "| model | crop | batch (src+tgt) | precision | plain MT step (s) | CPSL step (s) | ratio | "
    "self-labeling share | images/s plain | images/s CPSL | peak GPU memory (GiB) | GFLOP per CPSL step | MFU |\n"
    "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def format_row(row: Row, result: Result | None, gpu_name: str | None, note: str = "") -> str:
    """One Markdown table line; ``result`` None: a row that could not run (``note`` says why)."""
    head = f"| {row.label} | {row.crop[1]}x{row.crop[0]} | {row.batch}+{row.batch} | {row.precision} |"
    if result is None:
        return head + f" {note} |" + " - |" * 8
    mfu = model_flops_utilisation(result.flops, result.cpsl_s, peak_flops(gpu_name, row.precision))
    peak = "-" if result.peak_gib is None else f"{result.peak_gib:.1f}"
    flops = "-" if result.flops is None else _gflop_text(result.flops)
    return (
        f"{head} {result.plain_s:.3f} | {result.cpsl_s:.3f} | {result.cpsl_s / result.plain_s:.2f}x | "
        f"{100 * result.core_share:.1f}% | {result.images / result.plain_s:.1f} | "
        f"{result.images / result.cpsl_s:.1f} | {peak} | {flops} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} |"
    )


def _gflop_text(flops: float) -> str:
    """GFLOP: ``30,000`` at GPU sizes, three significant digits (``0.736``) below 100."""
    gflop = flops / 1e9
    return f"{gflop:,.0f}" if gflop >= 100 else f"{gflop:.3g}"


def reference_line(row: Row, result: Result, num_gpus: int = 1) -> str:
    """Our CPSL images/s per GPU as a multiple of :data:`REFERENCE_RECIPE`'s."""
    ours = result.images / result.cpsl_s / num_gpus
    reference = reference_images_per_second_per_gpu()
    return (
        f"- {row.label} {row.precision}: {ours:.2f} images/s per GPU = {ours / reference:.1f}x the reference "
        f"({REFERENCE_RECIPE['source']}: {reference:.3f} images/s per GPU)"
    )


def versions() -> str:
    import transformers

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return (
        f"torch {torch.__version__}, CUDA {torch.version.cuda or '-'}, cuDNN {cudnn or '-'}, "
        f"transformers {transformers.__version__}"
    )


def run_rows(
    rows: list[Row], steps: int, warmup: int, rounds: int, bank_size: int, gpu_name: str | None
) -> None:
    """Measure ``rows``, printing each table line as soon as it is measured (on stdout; progress on stderr),
    then the comparison with the reference recipe and the notes. A row that fails (out of memory, a compile
    error) is printed with the error and the others still run."""
    print()
    print(TABLE_HEADER, flush=True)
    results: list[tuple[Row, Result | None, str]] = []
    counted: dict[tuple, float] = {}  # FLOPs per CPSL step of each model and size, counted in its first row
    for row in rows:
        key = (row.backbone, row.crop, row.batch)
        started = time.perf_counter()
        result, note = None, ""
        try:
            result = measure(row, steps, warmup, rounds, bank_size, flops=counted.get(key))
            if result.flops is not None:
                counted.setdefault(key, result.flops)
        except Exception as error:  # one row's failure must not lose the others of a one-shot GPU run
            traceback.print_exc()
            note = f"failed: {type(error).__name__}: {' '.join(str(error).split())[:80]}"
        gc.collect()  # the row's trainer, models and batches go before the next row's are built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results.append((row, result, note))
        print(
            f"[{row.label} {row.precision}: {time.perf_counter() - started:.0f} s]",
            file=sys.stderr,
            flush=True,
        )
        print(format_row(row, result, gpu_name, note), flush=True)
    lines = [
        reference_line(row, result) for row, result, _ in results if row.reference and result is not None
    ]
    if lines:
        print()
        print("Against the published reference recipe (CPSL images/s per GPU; this run: 1 device):")
        print("\n".join(lines))
    print()
    if gpu_name is None:
        print("Note: MFU '-': no GPU (the FLOP count is of the CPU run; peak memory '-' on the CPU).")
        if warmup == 0:
            print(
                "Note: no warm-up: each stage's first step pays one-time costs; these timings test the code only."
            )
    elif known_gpu(gpu_name) is None:
        print(f"Note: MFU '-': no known dense peak for {gpu_name!r} (known: {', '.join(PEAK_TFLOPS)}).")
    else:
        key = known_gpu(gpu_name)
        print(
            f"Note: MFU against the {key} dense peaks: bf16 {PEAK_TFLOPS[key]['bf16']:g} TFLOP/s (bf16 rows), "
            f"TF32 {PEAK_TFLOPS[key]['tf32']:g} TFLOP/s (fp32 rows, TF32 allowed)."
        )


def select(rows: list[Row], only: list[str] | None) -> list[Row]:
    """The rows whose ``label precision`` contains one of ``only`` (all without ``only``)."""
    if not only:
        return rows
    return [row for row in rows if any(part in f"{row.label} {row.precision}" for part in only)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per round (default 5; dry run 1)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; dry run 0)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; dry run 1)")
    parser.add_argument("--gpu", action="store_true", help="the GPU section (needs CUDA): GPU_ROWS")
    parser.add_argument("--dry_run", action="store_true", help="the GPU section's code on the CPU, tiny rows")
    parser.add_argument("--compile", action="store_true", help="--dry_run: also the torch.compile rows")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="rows whose 'label precision' contains one of these (e.g. deeplab)",
    )
    parser.add_argument("--skip_cpu", action="store_true", help="(kept for old command lines; no effect)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = args.steps if args.steps is not None else (1 if args.dry_run else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.dry_run else 2)
    rounds = args.rounds if args.rounds is not None else (1 if args.dry_run else 3)

    if args.dry_run:
        print(f"GPU: none (dry run on the CPU: {platform.processor() or platform.machine()})")
        print(versions())
        run_rows(
            select(dry_run_rows(args.compile), args.only),
            steps,
            warmup,
            rounds,
            bank_size=1024,
            gpu_name=None,
        )
    elif args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: CUDA is not available (--dry_run runs this section's code on the CPU)")
        gpu_name = torch.cuda.get_device_name()
        print(f"GPU: {gpu_name}")
        print(versions())
        torch.backends.cudnn.benchmark = True
        run_rows(
            select(GPU_ROWS + LATER_GPU_ROWS, args.only),
            steps,
            warmup,
            rounds,
            bank_size=65536,
            gpu_name=gpu_name,
        )
    else:
        print(
            f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}"
        )
        run_rows(select(CPU_ROWS, args.only), steps, warmup, rounds, bank_size=65536, gpu_name=None)


if __name__ == "__main__":
    main()
