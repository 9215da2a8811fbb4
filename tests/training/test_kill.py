"""kill -9 of a 2-process run at an arbitrary moment (possibly inside a save) costs only the work since its last
complete checkpoint: resuming gives the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from training_helpers import FINAL_STATE_DRIVER, REPOSITORY, run, run_two_processes, tiny_argv

from cpsl_hf.training.checkpointing import list_checkpoints


@pytest.mark.slow
def test_kill_9_of_two_processes_resumes_to_the_uninterrupted_weights(tmp_path, synthetic_cache):
    common = ("--deterministic", "--save_predictions", "0", "--cpsl_steps", "6", "--checkpointing_steps", "1",
              "--checkpoints_total_limit", "3")  # fmt: skip
    run(
        tiny_argv(tmp_path / "warm", synthetic_cache, "--warmup_steps", "1", "--cpsl_steps", "0")
    )  # data once
    straight = tmp_path / "straight"
    straight.mkdir()
    run_two_processes(FINAL_STATE_DRIVER, straight, tiny_argv(straight / "run", synthetic_cache, *common))

    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "driver.py").write_text(FINAL_STATE_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(killed / "driver.py"), str(killed), *tiny_argv(killed / "run", synthetic_cache, *common),
    ]  # fmt: skip
    launcher = subprocess.Popen(
        command,
        env=env,
        cwd=REPOSITORY,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while not any(path.name == "checkpoint-4" for path in list_checkpoints(killed / "run")):
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and both ranks, wherever they are
    launcher.wait(timeout=60)
    assert not (killed / "rank0.pt").exists()  # it did not finish
    survivors = [path.name for path in list_checkpoints(killed / "run")]
    assert survivors and int(survivors[-1].split("-")[1]) < 8  # 2 warm-up + 6 CPSL steps: stopped early

    run_two_processes(
        FINAL_STATE_DRIVER,
        killed,
        tiny_argv(killed / "run", synthetic_cache, *common, "--resume_from_checkpoint", "latest"),
    )
    for rank in (0, 1):
        expected = torch.load(straight / f"rank{rank}.pt", weights_only=False)
        actual = torch.load(killed / f"rank{rank}.pt", weights_only=False)
        assert actual["step"] == expected["step"] == 8
        for part in ("student", "teacher", "selflabel"):
            for name, tensor in expected[part].items():
                torch.testing.assert_close(
                    actual[part][name], tensor, rtol=0, atol=0, msg=f"rank {rank} {part} {name}"
                )
