"""Two gloo processes on CPU give the same Q rows, banks, prior and diagnostics as one process with the
concatenated batch; the sharded (SwAV-style, all-reduced) sinkhorn and the prototype accumulator reduce exactly."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpsl_hf.selflabel import PrototypeAccumulator, SelfLabeling, sinkhorn

WORLD = 2
IMAGES_PER_PROCESS = 2
C, D, HEIGHT, WIDTH = 5, 8, 4, 4
# M = h * w: every labelled pixel is sampled, so the draw (and its order, pixel order) does not depend on the RNG
MODULE_ARGS = dict(num_samples=HEIGHT * WIDTH, bank_size=100, prior_momentum=0.8, logits_branch=True)


def make_inputs():
    generator = torch.Generator().manual_seed(0)
    total = WORLD * IMAGES_PER_PROCESS
    steps = []
    for _ in range(3):  # 64 samples per step into a bank of 100: fills and wraps
        z = torch.randn(total, D, HEIGHT, WIDTH, generator=generator)
        p_st = torch.softmax(3 * torch.randn(total, C, HEIGHT, WIDTH, generator=generator), dim=1)
        logits = torch.randn(total, C, HEIGHT, WIDTH, generator=generator)
        valid = torch.rand(total, HEIGHT, WIDTH, generator=generator) > 0.25  # padding samples too
        steps.append((z, p_st, logits, valid))
    return {
        "steps": steps,
        "teacher_w": torch.randn(C, D, generator=generator),
        "student_w": torch.randn(C, D, generator=generator),
        "histogram": torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]),
        "scores": torch.rand(40, C, generator=generator) * 2 - 1,
        "weights": torch.rand(40, generator=generator) > 0.3,
    }


def run_steps(module, data, rows):
    results = []
    for z, p_st, logits, valid in data["steps"]:
        out = module(
            z[rows],
            p_st[rows],
            data["teacher_w"],
            data["student_w"],
            teacher_logits=logits[rows],
            valid_mask=valid[rows],
        )
        results.append(
            {
                "q": out.q,
                "q_logits": out.q_logits,
                "loss": out.loss.detach(),
                "labels": out.labels,
                "sample_valid": out.sample_valid,
                "diagnostics": out.diagnostics,
            }
        )
    return results


def _worker(rank, init_file, data, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * IMAGES_PER_PROCESS, (rank + 1) * IMAGES_PER_PROCESS)
        module = SelfLabeling(C, D, **MODULE_ARGS)
        module.initialize_prior(data["histogram"])
        results = run_steps(module, data, rows)
        shard = slice(rank * 20, (rank + 1) * 20)
        sharded = sinkhorn(
            data["scores"][shard], torch.arange(1.0, C + 1), weights=data["weights"][shard], all_reduce=True
        )
        accumulator = PrototypeAccumulator(C, D)
        z, p_st, _, valid = data["steps"][0]
        accumulator.update(z[rows], p_st[rows], valid_mask=valid[rows])
        accumulator.all_reduce()
        torch.save(
            {
                "steps": results,
                "state": module.state_dict(),
                "sharded": sharded,
                "prototypes": accumulator.compute(),
            },
            f"{out_path}.{rank}",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    data = make_inputs()
    single = SelfLabeling(C, D, **MODULE_ARGS)
    single.initialize_prior(data["histogram"])
    expected = run_steps(single, data, slice(None))

    mp.spawn(_worker, args=(str(tmp_path / "init"), data, str(tmp_path / "out")), nprocs=WORLD, join=True)
    outputs = [torch.load(tmp_path / f"out.{rank}", weights_only=False) for rank in range(WORLD)]

    for step, reference in enumerate(expected):
        valid_counts = []
        for rank, output in enumerate(outputs):
            got = output["steps"][step]
            rows = slice(rank * IMAGES_PER_PROCESS, (rank + 1) * IMAGES_PER_PROCESS)
            torch.testing.assert_close(got["labels"], reference["labels"][rows], rtol=0, atol=0)
            torch.testing.assert_close(got["sample_valid"], reference["sample_valid"][rows])
            torch.testing.assert_close(got["q"], reference["q"][rows], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got["q_logits"], reference["q_logits"][rows], rtol=1e-5, atol=1e-7)
            for name, value in reference["diagnostics"].items():
                torch.testing.assert_close(got["diagnostics"][name], value, rtol=1e-6, atol=1e-7)
            valid_counts.append(got["sample_valid"].sum())
        # each process averages over its own samples; weighted by sample counts they give the global loss
        combined = sum(o["steps"][step]["loss"] * n for o, n in zip(outputs, valid_counts)) / sum(
            valid_counts
        )
        torch.testing.assert_close(combined, reference["loss"], rtol=1e-5, atol=1e-6)

    for output in outputs:  # banks (both) and prior identical to the single process
        for key, value in single.state_dict().items():
            torch.testing.assert_close(output["state"][key], value, rtol=1e-6, atol=1e-7)

    global_plan = sinkhorn(data["scores"], torch.arange(1.0, C + 1), weights=data["weights"])
    torch.testing.assert_close(torch.cat([o["sharded"] for o in outputs]), global_plan, rtol=1e-5, atol=1e-7)

    accumulator = PrototypeAccumulator(C, D)
    z, p_st, _, valid = data["steps"][0]
    accumulator.update(z, p_st, valid_mask=valid)
    for output in outputs:
        torch.testing.assert_close(output["prototypes"], accumulator.compute(), rtol=1e-6, atol=1e-7)
