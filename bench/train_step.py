"""Seconds per CPSL training step vs a plain mean-teacher self-training step, as a ratio in one run.

Both are the trainer's own adaptation step (:meth:`UDATrainer.cpsl_losses`) on the same batch, with the same
views (source crop; target weak view -> EMA teacher and the frozen ``P_ST`` model; target strong view ->
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

from cpsl_hf.training.arguments import parse_args  # noqa: E402
from cpsl_hf.training.trainer import UDATrainer, _frozen_copy  # noqa: E402


class BenchTrainer(UDATrainer):
    """The real trainer with random data instead of datasets (same model, optimizer, teacher, core)."""

    def __init__(self, args, image_size, source_batch, target_batch):
        super().__init__(args)
        self.image_size = image_size
        self.batch_sizes = (source_batch, target_batch)

    def _build_data(self):  # random uint8 images and labels, no datasets
        self._eval_loader_args = {}

    def random_batch(self, batch_size):
        height, width = self.image_size
        generator = torch.Generator().manual_seed(batch_size)
        images = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, self.num_classes, (batch_size, height, width), generator=generator)
        return {
            "pixel_values": images.to(self.device),
            "labels": labels.to(self.device),
            "name": [""] * batch_size,
        }

    def initialize_random(self):
        """What the init stage does, minus the pass over a dataset: teacher and frozen P_ST model copies, core
        with a uniform prior."""
        self.teacher.reset(self.unwrapped)
        self.pseudo_label_model = _frozen_copy(self.unwrapped)
        self.self_labeling = self.build_self_labeling()
        self.cpsl_initialized = True

    def method_losses(self, method: str):
        """The adaptation step's loss function with ``--method method`` (mean teacher: symmetric consistency)."""
        cpsl = self.args.cpsl
        defaults = (cpsl.method, cpsl.consistency)

        def losses(source_batch, target_batch):
            cpsl.method, cpsl.consistency = (method, "symmetric") if method == "mean_teacher" else defaults
            try:
                return self.cpsl_losses(source_batch, target_batch)[0]
            finally:
                cpsl.method, cpsl.consistency = defaults

        return losses


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(preset, image_size, crop, batch, steps, warmup, mixed_precision, bank_size=65536):
    """(plain s/step, cpsl s/step, share of the CPSL step in the core, images/s plain, cpsl, peak GiB)."""
    argv = [
        "--backbone", preset, "--crop_size", str(crop[0]), str(crop[1]),
        "--source_batch_size", str(batch), "--target_batch_size", str(batch),
        "--mixed_precision", mixed_precision, "--bank_size", str(bank_size),
        "--output_dir", "/tmp/cpsl_bench", "--no_progress_bar", "--optimizer", "adamw",
        "--synthetic_image_size", str(max(image_size[0], crop[0])), str(max(image_size[1], crop[1])),
    ]  # fmt: skip
    trainer = BenchTrainer(parse_args(argv), image_size, batch, batch)
    trainer.setup()
    trainer.initialize_random()
    device = trainer.device
    source, target = trainer.random_batch(batch), trainer.random_batch(batch)
    core_seconds = []
    original_forward = trainer.self_labeling.forward

    def timed_forward(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = original_forward(*args, **kwargs)
        _sync(device)
        core_seconds.append(time.perf_counter() - start)
        return out

    trainer.self_labeling.forward = timed_forward

    plain_losses, cpsl_losses = trainer.method_losses("mean_teacher"), trainer.method_losses("cpsl")

    def step(losses_fn):
        losses = losses_fn(source, {key: value for key, value in target.items() if key != "labels"})
        trainer.accelerator.backward(losses["loss"])
        for optimizer in trainer._optimizers():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        trainer.teacher.update(trainer.unwrapped)

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
