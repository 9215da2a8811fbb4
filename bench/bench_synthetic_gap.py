"""How big, and how adaptable, is the built-in synthetic domain shift?

1. Source-only: a tiny SegFormer (``CPSLConfig.from_preset("segformer-tiny")``, 0.85M parameters, random
   init) trains on the synthetic source for ``--source-steps`` steps (batch 8, random 128 x 128 crops and
   flips, AdamW). mIoU on the source and the target validation splits measures the gap.
2. From that checkpoint, three equal-budget continuations:
   - ``source-only control``: more source-only steps (``--control-steps``; a source step costs about
     0.43 of a mean-teacher step, so the default gives about equal wall time);
   - ``mean teacher``: EMA-teacher pseudo labels on weak target crops, kept where the teacher's confidence
     exceeds ``--threshold``, train the student on a strongly colour-augmented copy, beside the source loss;
   - ``mean teacher, class-balanced``: the same with a per-class threshold: ``min(threshold, running mean
     confidence of the class)``, so rare, hard classes keep pseudo labels too.

Prints a table of mIoU (and per-class IoU on the target) with step counts and wall times. Step counts are
fixed so the numbers do not depend on how busy the machine is; wall times are reported beside them.

    python bench/bench_synthetic_gap.py                 # 1000 + 3 continuations: ~3 + 3 x 2.7 minutes
    python bench/bench_synthetic_gap.py --source-steps 600 --adapt-steps 150 --control-steps 375  # quick

One torch thread by default: on 2 cores shared with other jobs, 2 threads were several times slower.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from cpsl_hf.data.protocols import CITYSCAPES_CLASSES, IGNORE_INDEX
from cpsl_hf.data.synthetic import load_synthetic

NUM_CLASSES = len(CITYSCAPES_CLASSES)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def build_model(seed: int) -> torch.nn.Module:
    """The segformer-tiny preset (depths 2,2,2,2; widths 16,32,64,128; decoder 128), random init."""
    torch.manual_seed(seed)
    from cpsl_hf import CPSLConfig, CPSLForSemanticSegmentation

    return CPSLForSemanticSegmentation(CPSLConfig.from_preset("segformer-tiny", num_labels=NUM_CLASSES))


def to_arrays(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset -> (images uint8 N x 3 x H x W, labels int64 N x H x W)."""
    images = np.stack([np.asarray(image) for image in dataset["image"]])
    labels = np.stack([np.asarray(label) for label in dataset["label"]])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()


def random_crops(images, labels, batch_size, crop, generator):
    """Random images, crops ``crop x crop`` and horizontal flips -> (float N x 3 x c x c in [0,1], N x c x c)."""
    count, _, height, width = images.shape
    index = torch.randint(count, (batch_size,), generator=generator)
    top = torch.randint(height - crop + 1, (batch_size,), generator=generator)
    left = torch.randint(width - crop + 1, (batch_size,), generator=generator)
    rows = top[:, None] + torch.arange(crop)[None, :]  # N x c
    cols = left[:, None] + torch.arange(crop)[None, :]
    flip = torch.rand(batch_size, generator=generator) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_images = images[
        index[:, None, None, None],
        torch.arange(3)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    batch_labels = labels[index[:, None, None], rows[:, :, None], cols[:, None, :]]
    return batch_images.float() / 255.0, batch_labels


def strong_colour(images, generator):
    """Per-image brightness, contrast, saturation, channel gains, blur and noise on float N x 3 x h x w."""
    count = images.shape[0]

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(count, *shape, generator=generator)

    grey = images.mean(dim=1, keepdim=True)
    images = grey + (images - grey) * uniform(0.4, 1.4, 1, 1, 1)  # saturation
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = mean + (images - mean) * uniform(0.6, 1.4, 1, 1, 1)  # contrast
    images = images * uniform(0.7, 1.3, 1, 1, 1) * uniform(0.85, 1.15, 3, 1, 1)  # brightness, white balance
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4.0
    planes = F.pad(images.reshape(-1, 1, *images.shape[-2:]), (1, 1, 1, 1), mode="replicate")
    blurred = F.conv2d(planes, (kernel[:, None] * kernel[None, :])[None, None]).reshape(images.shape)
    blur = torch.rand(count, 1, 1, 1, generator=generator) < 0.5
    images = torch.where(blur, blurred, images)
    images = images + torch.randn(images.shape, generator=generator) * uniform(0.0, 0.04, 1, 1, 1)
    return images.clamp(0.0, 1.0)


def logits_of(model, images):
    """ImageNet-normalised float images N x 3 x h x w -> logits N x C x h x w (upsampled bilinearly)."""
    logits = model(pixel_values=(images - MEAN) / STD).logits
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate(model, images, labels, batch_size=25):
    """mIoU (%) and per-class IoU (%) over a whole split, from a bincount confusion matrix."""
    model.eval()
    confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].float() / 255.0
        target = labels[start : start + batch_size]
        prediction = logits_of(model, batch).argmax(dim=1)
        valid = target != IGNORE_INDEX
        confusion += torch.bincount(
            target[valid] * NUM_CLASSES + prediction[valid], minlength=NUM_CLASSES * NUM_CLASSES
        )
    model.train()
    confusion = confusion.view(NUM_CLASSES, NUM_CLASSES).double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = true_positive / union.clamp(min=1)
    present = union > 0
    return 100 * iou[present].mean().item(), 100 * iou


class EMA:
    """EMA teacher: ``teacher = momentum * teacher + (1 - momentum) * student`` after every step."""

    def __init__(self, student, momentum):
        self.teacher = copy.deepcopy(student).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.momentum = momentum

    @torch.no_grad()
    def update(self, student):
        teacher_params = list(self.teacher.parameters())
        torch._foreach_lerp_(teacher_params, list(student.parameters()), 1.0 - self.momentum)


def train(
    model, steps, source, target=None, mode="source", args=None, generator=None, optimizer=None, schedule=None
):
    """Run ``steps`` steps of source-only or mean-teacher training; returns (wall seconds, diagnostics)."""
    ema = EMA(model, args.ema) if mode != "source" else None
    class_confidence = torch.full((NUM_CLASSES,), args.threshold)
    kept_share = torch.zeros(())
    start = time.perf_counter()
    for step in range(steps):
        if args.progress and step % args.progress == 0:
            print(f"  {mode} step {step}/{steps} ({time.perf_counter() - start:.0f} s)", flush=True)
        images, labels = random_crops(*source, args.batch_size, args.crop, generator)
        loss = F.cross_entropy(logits_of(model, images), labels, ignore_index=IGNORE_INDEX)
        if mode != "source":
            target_images, _ = random_crops(*target, args.batch_size, args.crop, generator)
            with torch.no_grad():
                probabilities = logits_of(ema.teacher, target_images).softmax(dim=1)
                confidence, pseudo = probabilities.max(dim=1)
                if mode == "class-balanced":
                    # running mean confidence of each predicted class (vectorised with bincount)
                    sums = torch.bincount(pseudo.flatten(), confidence.flatten(), minlength=NUM_CLASSES)
                    counts = torch.bincount(pseudo.flatten(), minlength=NUM_CLASSES)
                    batch_mean = torch.where(counts > 0, sums / counts.clamp(min=1), class_confidence)
                    class_confidence = 0.9 * class_confidence + 0.1 * batch_mean
                    threshold = class_confidence.clamp(max=args.threshold)[pseudo]
                else:
                    threshold = args.threshold
                keep = confidence >= threshold
                kept_share = kept_share + keep.float().mean()
                pseudo = torch.where(keep, pseudo, torch.full_like(pseudo, IGNORE_INDEX))
            student_logits = logits_of(model, strong_colour(target_images, generator))
            loss = loss + args.target_weight * F.cross_entropy(
                student_logits, pseudo, ignore_index=IGNORE_INDEX
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if ema is not None:
            ema.update(model)
    seconds = time.perf_counter() - start
    return seconds, {"kept": (kept_share / max(steps, 1)).item()} if mode != "source" else {}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source-steps", type=int, default=1000)
    parser.add_argument("--adapt-steps", type=int, default=400)
    parser.add_argument("--control-steps", type=int, default=920)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--adapt-lr", type=float, default=3e-4)
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--target-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 threads on 2 busy cores is slower)"
    )
    parser.add_argument("--progress", type=int, default=100, help="print progress every N steps (0: never)")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["control", "mean-teacher", "class-balanced"]
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    splits = {
        (domain, split): to_arrays(load_synthetic(domain, split, seed=args.data_seed))
        for domain in ("source", "target")
        for split in ("train", "validation")
    }
    print(f"data: {time.perf_counter() - start:.1f} s (load_synthetic, cached after the first call)")
    source, target = splits["source", "train"], splits["target", "train"]
    source_val, target_val = splits["source", "validation"], splits["target", "validation"]

    model = build_model(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup, total = max(args.source_steps // 20, 1), args.source_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(1.0 - step / total, 0.0) ** 0.9
    )
    seconds, _ = train(
        model,
        args.source_steps,
        source,
        args=args,
        generator=generator,
        optimizer=optimizer,
        schedule=schedule,
    )
    rows = [
        (
            "source-only",
            args.source_steps,
            seconds,
            evaluate(model, *source_val),
            evaluate(model, *target_val),
            "",
        )
    ]
    print(
        f"source-only: {args.source_steps} steps in {seconds:.0f} s: mIoU source {rows[0][3][0]:.1f}, "
        f"target {rows[0][4][0]:.1f}",
        flush=True,
    )
    warm = copy.deepcopy(model.state_dict())

    continuations = [
        ("control", "source"),
        ("mean-teacher", "mean-teacher"),
        ("class-balanced", "class-balanced"),
    ]
    names = {
        "control": "+ source-only control",
        "mean-teacher": "+ mean teacher",
        "class-balanced": "+ mean teacher, class-balanced",
    }
    for name, mode in continuations:
        if name in args.skip:
            continue
        model.load_state_dict(warm)
        steps = args.control_steps if mode == "source" else args.adapt_steps
        adapt_optimizer = torch.optim.AdamW(model.parameters(), lr=args.adapt_lr, weight_decay=0.01)
        adapt_generator = torch.Generator().manual_seed(args.seed + 1)
        seconds, info = train(
            model,
            steps,
            source,
            target,
            mode=mode,
            args=args,
            generator=adapt_generator,
            optimizer=adapt_optimizer,
        )
        note = f"pseudo labels kept {100 * info['kept']:.0f}%" if info else ""
        rows.append(
            (names[name], steps, seconds, evaluate(model, *source_val), evaluate(model, *target_val), note)
        )
        print(f"{names[name]}: {steps} steps in {seconds:.0f} s {note}")

    print()
    print("| run | steps | wall (s) | source val mIoU | target val mIoU | notes |")
    print("|---|---:|---:|---:|---:|---|")
    for name, steps, seconds, (source_miou, _), (target_miou, _), note in rows:
        print(f"| {name} | {steps} | {seconds:.0f} | {source_miou:.1f} | {target_miou:.1f} | {note} |")
    print()
    header = " ".join(f"{name[:6]:>6}" for name in CITYSCAPES_CLASSES)
    print(f"per-class IoU (%)               {header}")
    for name, *_, (_, source_iou), (_, target_iou), _ in rows:
        print(f"{name[:24]:<24} source " + " ".join(f"{value:6.1f}" for value in source_iou.tolist()))
        print(f"{'':<24} target " + " ".join(f"{value:6.1f}" for value in target_iou.tolist()))


if __name__ == "__main__":
    main()
