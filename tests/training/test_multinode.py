"""Two machines of one node: ``accelerate launch --num_machines 2`` over loopback (gloo, one process each) trains
exactly as one machine with two processes (``torchrun --nproc_per_node 2``)."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from training_helpers import REPOSITORY, run, run_two_processes, tiny_argv

DRIVER = textwrap.dedent(
    """
    import sys
    import torch
    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    trainer = Trainer(parse_args(sys.argv[2:]))
    trainer.train()
    state = {
        "student": trainer.student.state_dict(),
        "teacher": trainer.stages[1].teacher.module.state_dict(),
        "world": trainer.accelerator.num_processes,
        "history": trainer.history,
    }
    torch.save(state, f"{sys.argv[1]}/rank{trainer.accelerator.process_index}.pt")
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_machines_of_one_process_equal_one_machine_of_two(tmp_path, synthetic_cache):
    flags = (
        "--deterministic",
        "--save_predictions",
        "0",
        "--source_batch_size",
        "1",
        "--target_batch_size",
        "1",
    )
    run(
        tiny_argv(tmp_path / "warm", synthetic_cache, "--warmup_steps", "1", "--cpsl_steps", "0")
    )  # data once
    one = tmp_path / "one_machine"
    one.mkdir()
    run_two_processes(DRIVER, one, tiny_argv(one / "run", synthetic_cache, *flags))

    two = tmp_path / "two_machines"
    two.mkdir()
    (two / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
    port = str(_free_port())
    machines = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_machines",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
                "--num_processes",
                "2",
                str(two / "driver.py"),
                str(two),
                *tiny_argv(two / "run", synthetic_cache, *flags),
            ],  # fmt: skip
            env=env,
            cwd=REPOSITORY,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for machine in machines:
        _, stderr = machine.communicate(timeout=300)
        assert machine.returncode == 0, stderr[-4000:]

    for rank in (0, 1):
        expected = torch.load(one / f"rank{rank}.pt", weights_only=False)
        actual = torch.load(two / f"rank{rank}.pt", weights_only=False)
        assert actual["world"] == expected["world"] == 2
        for part in ("student", "teacher"):
            for name, tensor in expected[part].items():
                torch.testing.assert_close(actual[part][name], tensor, rtol=0, atol=0, msg=f"{part} {name}")
        assert actual["history"] == expected["history"]
