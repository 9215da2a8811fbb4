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
    python bench/train_step.py --gpu            # + GPU: segformer-b5 512x512 2+2, deeplabv2-r101 896x512 4+4, bf16

Prints Markdown tables (paste into BENCHMARKS.md with the hardware line).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses  # noqa: E402
import tempfile  # noqa: E402

from cpsl_hf.training.arguments import parse_args  # noqa: E402
from cpsl_hf.training.loop import Trainer  # noqa: E402
from cpsl_hf.training.stages import CPSLStage, MeanTeacherStage  # noqa: E402


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


def measure(preset, image_size, crop, batch, steps, warmup, mixed_precision, bank_size=65536):
    """(plain s/step, cpsl s/step, share of the CPSL step in the core, images/s plain, cpsl, peak GiB)."""
    cache_dir = tempfile.mkdtemp(prefix="cpsl_bench_data_")
    argv = [
        "--backbone", preset, "--crop_size", str(crop[0]), str(crop[1]),
        "--source_batch_size", str(batch), "--target_batch_size", str(batch),
        "--mixed_precision", mixed_precision, "--bank_size", str(bank_size),
        "--output_dir", "/tmp/cpsl_bench", "--no_progress_bar", "--optimizer", "adamw",
        "--synthetic_image_size", str(max(image_size[0], crop[0])), str(max(image_size[1], crop[1])),
        "--synthetic_train_images", str(batch), "--synthetic_val_images", "1", "--synthetic_cache_dir", cache_dir,
        "--warmup_steps", "0", "--no_pseudo_label_diagnostics", "--eval_batch_size", "1",
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
    core_seconds.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Interleave rounds of both so load changes on a shared machine hit both alike.
    plain, cpsl = [], []
    for _ in range(3):
        plain += time_steps(plain_losses)
        cpsl += time_steps(cpsl_losses)
    plain_s, cpsl_s = statistics.median(plain), statistics.median(cpsl)
    core_share = statistics.median(core_seconds) / cpsl_s
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    images = 2 * batch
    return plain_s, cpsl_s, core_share, images / plain_s, images / cpsl_s, peak


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round (3 rounds each)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="also run the GPU section (needs CUDA)")
    parser.add_argument("--skip_cpu", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    rows = []
    if not args.skip_cpu and not torch.cuda.is_available():
        print(
            f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        )
        rows.append(
            (
                "segformer-tiny (demo)",
                "128x128",
                "8+8",
                "fp32",
                *measure("segformer-tiny", (128, 256), (128, 128), 8, args.steps, args.warmup, "no"),
            )
        )
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: CUDA is not available")
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        rows.append(
            (
                "segformer-b5",
                "512x512",
                "2+2",
                "bf16",
                *measure("segformer-b5", (512, 1024), (512, 512), 2, args.steps, args.warmup, "bf16"),
            )
        )
        rows.append(
            (
                "deeplabv2-r101",
                "896x512",
                "4+4",
                "bf16",
                *measure("deeplabv2-r101", (1024, 2048), (512, 896), 4, args.steps, args.warmup, "bf16"),
            )
        )
    print()
    print(
        "| model | crop | batch (src+tgt) | precision | plain MT step (s) | CPSL step (s) | ratio | "
        "self-labeling share | images/s plain | images/s CPSL | peak GPU memory (GiB) |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, crop, batch, precision, plain, cpsl, share, ips_plain, ips_cpsl, peak in rows:
        peak_text = "-" if peak != peak else f"{peak:.1f}"
        print(
            f"| {name} | {crop} | {batch} | {precision} | {plain:.3f} | {cpsl:.3f} | {cpsl / plain:.2f}x | "
            f"{100 * share:.1f}% | {ips_plain:.1f} | {ips_cpsl:.1f} | {peak_text} |"
        )


if __name__ == "__main__":
    main()
