"""Benchmark of the self-labeling core against the published code's style (and POT), printed as one table.

    python bench/bench_selflabel.py [--threads 1] [--repeats 7] [--device cpu]

(a) Sinkhorn on 65,792 x 19 (a full 65,536-row bank + 256 current samples), 3 iterations: ``cpsl_hf``'s
    ``sinkhorn`` vs ``ot.sinkhorn`` (torch backend, same iterations) vs the published code's in-place
    SwAV-style loop; then the assignment work of one step for 4 images: the published code's per-image loop
    (4 Sinkhorns on [queue; 256] and 4 shift-copies ``torch.cat([new, queue[:-n]])``) vs one Sinkhorn on
    [bank; 1,024] with a masked bank and one ring-buffer enqueue.
(b) One whole self-labeling step (rectification, sampling M = 256 per image, bank scoring, Sinkhorn, L_SL and its
    backward to W, enqueue, prior update) for a batch of 4 at 64 x 128 (1/8 of a 512 x 1024 crop), D = 256,
    C = 19, bank 65,536: ``SelfLabeling`` vs a straightforward per-image reimplementation of the published code
    (uniform sampling, as published) and a per-image/per-class Python loop for class-balanced sampling.

Timings are medians over ``--repeats`` rounds in which the variants run interleaved; ratios are
reference time / cpsl_hf time (> 1: cpsl_hf is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import ot
import torch
import torch.nn.functional as F

from cpsl_hf.selflabel import SelfLabeling, class_balanced_sample, sinkhorn

C, D, M, BANK, BATCH, HEIGHT, WIDTH = 19, 256, 256, 65536, 4, 64, 128
EPSILON, ITERATIONS, TAU = 0.05, 3, 0.08


# ---------------------------------------------------------------- the published code's style (reimplemented)
@torch.no_grad()
def published_sinkhorn(scores: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """In-place SwAV loop with a class prior, as in the published code (no max subtraction, input dtype)."""
    q = torch.exp(scores / EPSILON).t()
    num_rows = q.shape[1]
    q /= q.sum()
    for _ in range(ITERATIONS):
        q /= q.sum(dim=1, keepdim=True)
        q *= prior[:, None]
        q /= q.sum(dim=0, keepdim=True)
        q /= num_rows
    q *= num_rows
    return q.t()


def published_assignment(queue, current_scores_per_image, prototypes, prior, current_rows_per_image):
    """Per image: score the queue, Sinkhorn on [queue; current], shift-copy the queue. Returns (q rows, queue)."""
    targets = []
    for scores, rows in zip(current_scores_per_image, current_rows_per_image):
        all_scores = torch.cat([queue @ prototypes.t(), scores])
        targets.append(published_sinkhorn(all_scores, prior)[-scores.shape[0] :])
        queue = torch.cat([rows, queue[: -rows.shape[0]]])
    return targets, queue


def loop_class_balanced_indices(labels_flat: torch.Tensor) -> torch.Tensor:
    """Per-class Python loop: nonzero + randperm per class, largest remainder in Python (one image)."""
    labelled = labels_flat != 255
    total = int(labelled.sum())
    classes, counts = labels_flat[labelled].unique(return_counts=True)
    shares = [M * int(n) / total for n in counts]
    quotas = [int(s) for s in shares]
    for k in sorted(range(len(shares)), key=lambda i: quotas[i] - shares[i])[: M - sum(quotas)]:
        quotas[k] += 1
    picked = []
    for c, quota in zip(classes.tolist(), quotas):
        pixels = torch.nonzero(labels_flat == c).squeeze(1)
        picked.append(pixels[torch.randperm(pixels.numel())[:quota]])
    return torch.cat(picked)


class PublishedStyleStep:
    """The published code's step, reimplemented plainly: per-image sampling loop, per-image Sinkhorn on
    [queue; current], shift-copy queue; the rectification is the same vectorised computation as ours."""

    def __init__(self, device, sampling="uniform"):
        self.queue = F.normalize(torch.randn(BANK, D, device=device), dim=1)
        self.prior = torch.full((C,), 1.0 / C, device=device)
        self.sampling = sampling

    def __call__(self, teacher_z, p_st, teacher_w, student_w):
        with (
            torch.no_grad()
        ):  # the same vectorised P_SL / rectification as SelfLabeling (not what is compared)
            flat_z = teacher_z.flatten(2)  # N x D x P
            inverse_norm = torch.linalg.vector_norm(flat_z, dim=1, keepdim=True).clamp_min(1e-12).reciprocal()
            cosine = torch.matmul(F.normalize(teacher_w, dim=1), flat_z) * inverse_norm
            labels = (torch.softmax(cosine / TAU, 1) * p_st.flatten(2)).argmax(1)  # N x P
        proto = F.normalize(student_w, dim=1)
        loss = 0.0
        for n in range(flat_z.shape[0]):
            if self.sampling == "uniform":
                index = torch.randperm(flat_z.shape[2], device=flat_z.device)[:M]
            else:
                index = loop_class_balanced_indices(labels[n])
            with torch.no_grad():
                samples = F.normalize(flat_z[n][:, index].t(), dim=1)
            out = samples @ proto.t()
            with torch.no_grad():
                all_scores = torch.cat([self.queue @ proto.detach().t(), out.detach()])
                self.queue = torch.cat([samples, self.queue[:-M]])
                q = published_sinkhorn(all_scores, self.prior)[-M:]
            loss = loss - (q * F.log_softmax(out / TAU, dim=1)).sum(1).mean()
        loss = loss / flat_z.shape[0]
        loss.backward()
        with torch.no_grad():
            histogram = torch.bincount(labels.reshape(-1), minlength=C).float()
            self.prior = 0.999 * self.prior + 0.001 * histogram / histogram.sum()
        return loss


# ---------------------------------------------------------------- timing
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(variants: dict, repeats: int, device) -> dict[str, float]:
    """Median seconds per call; variants run interleaved (round-robin) after one warm-up call each."""
    for fn in variants.values():
        fn()
    synchronize(device)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    # ot.sinkhorn warns that 3 iterations do not converge: that is the point of the comparison
    warnings.filterwarnings("ignore", message="Sinkhorn did not converge")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = []  # (section, variant, seconds, reference seconds or None)

    # (a) Sinkhorn alone and the per-step assignment work
    prior = torch.softmax(torch.randn(C, device=device), 0)
    scores = (
        F.normalize(torch.randn(BANK + M, D, device=device), dim=1)
        @ F.normalize(torch.randn(C, D, device=device), dim=1).t()
    )
    uniform_rows = torch.full((BANK + M,), 1.0 / (BANK + M), device=device)
    timings = measure(
        {
            "ours": lambda: sinkhorn(scores, prior, EPSILON, ITERATIONS),
            "pot": lambda: ot.sinkhorn(
                uniform_rows, prior, -scores, EPSILON, numItermax=ITERATIONS, stopThr=0.0
            ),
            "published": lambda: published_sinkhorn(scores, prior),
        },
        args.repeats,
        device,
    )
    label = f"sinkhorn {BANK + M:,} x {C}, {ITERATIONS} it"
    rows.append(("a", f"{label}: cpsl_hf.sinkhorn", timings["ours"], None))
    rows.append(("a", f"{label}: ot.sinkhorn (torch backend)", timings["pot"], timings["ours"]))
    rows.append(("a", f"{label}: published-code loop", timings["published"], timings["ours"]))

    prototypes = F.normalize(torch.randn(C, D, device=device), dim=1)
    current = [F.normalize(torch.randn(M, D, device=device), dim=1) for _ in range(BATCH)]
    current_scores = [x @ prototypes.t() for x in current]
    queue = F.normalize(torch.randn(BANK, D, device=device), dim=1)
    module = SelfLabeling(C, D, num_samples=M, bank_size=BANK).to(device)
    module.bank.enqueue(queue)
    gathered = torch.cat(current)
    gathered_valid = torch.ones(BATCH * M, dtype=torch.bool, device=device)

    def ours_assignment():
        q = module._assign(module.bank, gathered, gathered_valid, prototypes.t())[BANK:]
        module.bank.enqueue(gathered, gathered_valid)
        return q

    timings = measure(
        {
            "ours": ours_assignment,
            "published": lambda: published_assignment(queue, current_scores, prototypes, prior, current),
        },
        args.repeats,
        device,
    )
    label = f"assignment for {BATCH} images (bank scoring + Sinkhorn + enqueue)"
    rows.append(
        ("a", f"{label}: cpsl_hf, one Sinkhorn on [bank; {BATCH * M}] + ring enqueue", timings["ours"], None)
    )
    rows.append(
        (
            "a",
            f"{label}: published, per-image Sinkhorn + shift-copy queue",
            timings["published"],
            timings["ours"],
        )
    )

    # (b) the whole step
    teacher_z = torch.randn(BATCH, D, HEIGHT, WIDTH, device=device)
    p_st = torch.softmax(3 * torch.randn(BATCH, C, HEIGHT, WIDTH, device=device), 1)
    teacher_w = torch.randn(C, D, device=device)
    student_w = torch.nn.Parameter(teacher_w + 0.1 * torch.randn(C, D, device=device))
    steps = {}
    for sampling in ("class_balanced", "uniform"):
        step_module = SelfLabeling(C, D, num_samples=M, bank_size=BANK, sampling=sampling).to(device)
        step_module.bank.enqueue(queue)

        def ours_step(step_module=step_module):
            student_w.grad = None
            out = step_module(teacher_z, p_st, teacher_w, student_w)
            out.loss.backward()
            return out

        steps[f"ours_{sampling}"] = ours_step
        reference = PublishedStyleStep(device, sampling)

        def published_step(reference=reference):
            student_w.grad = None
            return reference(teacher_z, p_st, teacher_w, student_w)

        steps[f"published_{sampling}"] = published_step
    timings = measure(steps, args.repeats, device)
    label = f"step N={BATCH}, {HEIGHT}x{WIDTH}, D={D}, C={C}, bank {BANK:,}"
    for sampling, name in (("uniform", "uniform (as published)"), ("class_balanced", "class-balanced")):
        rows.append(("b", f"{label}, {name}: SelfLabeling", timings[f"ours_{sampling}"], None))
        rows.append(
            (
                "b",
                f"{label}, {name}: per-image loop + shift-copy queue",
                timings[f"published_{sampling}"],
                timings[f"ours_{sampling}"],
            )
        )
    # sampling alone, vectorised vs per-image/per-class loop
    labels = torch.randint(0, C, (BATCH, HEIGHT, WIDTH), device=device)
    timings = measure(
        {
            "ours": lambda: class_balanced_sample(labels, M, num_classes=C),
            "loop": lambda: [loop_class_balanced_indices(labels[n].reshape(-1)) for n in range(BATCH)],
        },
        args.repeats,
        device,
    )
    rows.append(
        ("b", f"class-balanced sampling {BATCH} x {HEIGHT}x{WIDTH}: vectorised", timings["ours"], None)
    )
    rows.append(
        (
            "b",
            f"class-balanced sampling {BATCH} x {HEIGHT}x{WIDTH}: per-image/class loop",
            timings["loop"],
            timings["ours"],
        )
    )

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {device_name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"median of {args.repeats} interleaved rounds"
    )
    print()
    print("| part | variant | ms | ratio (reference / cpsl_hf) |")
    print("|---|---|---:|---:|")
    for section, name, seconds, ours_seconds in rows:
        ratio = "1.00 (baseline)" if ours_seconds is None else f"{seconds / ours_seconds:.2f}x"
        print(f"| {section} | {name} | {seconds * 1e3:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
