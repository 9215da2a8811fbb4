"""Where the built-in demo's time goes: start-up imports, data generation, warm-up steps, the CPSL stage's start
(the teacher's pass over the target set), CPSL steps, evaluations and the export, timed in the real trainer.

The run is the demo (``configs/synthetic_demo.yaml``, every argument of ``scripts/train.py`` accepted and
appended); each phase is timed by wrapping the trainer's own methods in a subclass, so the numbers are those of
the loop the README's command runs. ``--op_profile N`` also runs ``torch.profiler`` over N steps of each stage
(after the phase timing: the profiler's overhead is not in the table) and prints the top operators. Times are
exclusive: an evaluation inside a stage's start counts under evaluations only.

    python bench/profile_demo.py                       # the whole demo, phases table
    python bench/profile_demo.py --warmup_steps 200 --cpsl_steps 60 --op_profile 10
    python bench/profile_demo.py --warmup_steps 200 --cpsl_steps 60 --op_profile 10 --op_shapes  # by input shape

Prints Markdown tables (paste into BENCHMARKS.md with the command and the hardware line).
"""

from __future__ import annotations

import collections
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def import_seconds(module: str, repeats: int = 3) -> float:
    """Median wall time of ``import module`` in a fresh interpreter (what every script pays before it starts)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    times = sorted(
        float(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(repeats)
    )
    return times[len(times) // 2]


def main() -> None:
    op_steps = 0
    argv = sys.argv[1:]
    shapes = "--op_shapes" in argv
    if shapes:
        argv.remove("--op_shapes")
    if "--op_profile" in argv:
        position = argv.index("--op_profile")
        op_steps = int(argv[position + 1])
        del argv[position : position + 2]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    imports = import_seconds("cpsl_hf.training.loop")

    import torch

    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    phases: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)

    children: list[float] = [0.0]  # time spent in timed calls nested in the current one (exclusive times)

    def timed(name_of, method):
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            children.append(0.0)
            try:
                return method(self, *args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                name = name_of(self, *args)
                phases[name] += elapsed - children.pop()
                children[-1] += elapsed
                counts[name] += 1

        return wrapper

    class PhaseTimer(Trainer):
        """The trainer with its phases timed (nothing else changes)."""

        _build_data = timed(
            lambda self: "data: datasets (synthetic generation or cache) and loaders", Trainer._build_data
        )
        _build_model_and_optimizers = timed(
            lambda self: "model and optimisers", Trainer._build_model_and_optimizers
        )
        micro_step = timed(lambda self, stage: f"steps: {stage.name}", Trainer.micro_step)
        optimisation_step_done = timed(
            lambda self, stage: f"steps: {stage.name}", Trainer.optimisation_step_done
        )
        _log_window = timed(lambda self, *a: "log windows (the host sync)", Trainer._log_window)
        start_stage = timed(lambda self, stage: f"start: {stage.name}", Trainer.start_stage)
        evaluate = timed(lambda self, stage: "evaluations", Trainer.evaluate)
        save = timed(lambda self: "checkpoints", Trainer.save)
        _end_run = timed(lambda self, stop: "export (model, card, predictions)", Trainer._end_run)

    with tempfile.TemporaryDirectory() as scratch:
        args = parse_args(["--output_dir", str(Path(scratch) / "run"), "--no_progress_bar", *argv])
        started = time.perf_counter()
        trainer = PhaseTimer(args)
        trainer.train()
        total = time.perf_counter() - started
    steps_per_stage = {stage.name: stage.steps for stage in trainer.stages}
    print(
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; {' + '.join(f'{n} {s}' for n, s in steps_per_stage.items())} steps"
    )
    print()
    print("| phase | seconds | share of the run | calls | per call (ms) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| start-up imports (`import cpsl_hf.training.loop`, fresh process) | {imports:.2f} | - | 1 | - |")
    accounted = 0.0
    for name in sorted(phases, key=lambda n: -phases[n]):
        seconds = phases[name]
        accounted += seconds
        print(
            f"| {name} | {seconds:.2f} | {100 * seconds / total:.1f}% | {counts[name]} | "
            f"{1000 * seconds / counts[name]:.1f} |"
        )
    print(
        f"| the rest (setup, schedules, logging) | {total - accounted:.2f} | {100 * (total - accounted) / total:.1f}% | - | - |"
    )
    print(f"| **run (Trainer.train)** | **{total:.2f}** | 100% | | |")
    if op_steps:
        profile_operators(argv, op_steps, shapes)


def profile_operators(argv: list[str], steps: int, shapes: bool = False) -> None:
    """torch.profiler over ``steps`` steps of each stage of a fresh run; the top operators by self CPU time
    (with ``shapes``, one row per operator and input shapes: which tensor an operator was slow on)."""
    from torch.profiler import ProfilerActivity, profile

    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    for stage_index in range(2):
        with tempfile.TemporaryDirectory() as scratch:
            # The scratch folder last: it wins over an --output_dir of the timed run (which holds that run now).
            args = parse_args([*argv, "--no_progress_bar", "--output_dir", str(Path(scratch) / "run")])
            trainer = Trainer(args)
            trainer.setup()
            stage = trainer.stages[stage_index]
            if stage_index:
                trainer.stages[0].started = True
                trainer.start_stage(stage)
            else:
                trainer.start_stage(stage)
            trainer.model.train()
            for _ in range(2):  # warm the allocator and caches
                trainer.micro_step(stage)
                trainer.optimisation_step_done(stage)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
                for _ in range(steps):
                    trainer.micro_step(stage)
                    trainer.optimisation_step_done(stage)
            print(f"\n### {stage.name}: top operators over {steps} steps (self CPU time)\n")
            table = prof.key_averages(group_by_input_shape=shapes).table(
                sort_by="self_cpu_time_total",
                row_limit=25,
                max_name_column_width=40,
                max_shapes_column_width=70,
            )
            print(table)
            trainer.folder_lock.release()


if __name__ == "__main__":
    main()
