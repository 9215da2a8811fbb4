"""One run per output folder: a finished run is not overwritten by accident, a running one is never shared, and
a lock left by a killed run does not block the requeued one."""

import os
import signal
import subprocess
import sys
import time

import pytest
from training_helpers import REPOSITORY, run, tiny_argv

from cpsl_hf.training.checkpointing import list_checkpoints
from cpsl_hf.training.run_folder import LOCK_FILE, OutputFolderError


def _argv(output_dir, cache, *extra):
    return tiny_argv(output_dir, cache, "--save_predictions", "0", "--checkpointing_steps", "1", *extra)


def test_a_new_run_into_a_finished_one_is_refused_unless_resumed_or_overwritten(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    run(_argv(out, synthetic_cache))
    assert (out / "metrics.json").is_file() and not (out / LOCK_FILE).exists()  # released at the end
    old = [path.name for path in list_checkpoints(out)]
    assert old[-1] == "checkpoint-4"
    with pytest.raises(OutputFolderError, match=r"--output_dir .*: holds a run already \(metrics.json, "):
        run(_argv(out, synthetic_cache))
    resumed = run(_argv(out, synthetic_cache, "--resume_from_checkpoint", "latest"))
    assert resumed.step == 4  # resumed at the end: nothing left to train, exported again

    modified = (out / "checkpoints" / "checkpoint-4").stat().st_mtime_ns
    fresh = run(
        _argv(out, synthetic_cache, "--overwrite_output_dir", "--warmup_steps", "1", "--cpsl_steps", "1")
    )
    assert fresh.step == 2
    # The old run's checkpoints are gone: a later "latest" cannot pick checkpoint-4 of the previous run.
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "checkpoints" / "checkpoint-4").exists() and modified


def _start(out, cache, *extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPOSITORY / "scripts" / "train.py"), *_argv(out, cache, *extra)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_second_run_into_a_running_folder_is_refused_and_a_killed_runs_lock_is_not(
    tmp_path, synthetic_cache
):
    out = tmp_path / "run"
    run(_argv(tmp_path / "warm", synthetic_cache, "--warmup_steps", "1", "--cpsl_steps", "0"))  # data once
    first = _start(out, synthetic_cache, "--warmup_steps", "400", "--cpsl_steps", "0")
    try:
        deadline = time.time() + 120
        while not list_checkpoints(out):  # the lock is taken before the first step
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        holder = (out / LOCK_FILE).read_text()
        assert f"pid {first.pid}" in holder
        second = _start(out, synthetic_cache, "--resume_from_checkpoint", "latest")
        _, stderr = second.communicate(timeout=120)
        assert second.returncode != 0
        assert f"another run is writing to it (host {os.uname().nodename} pid {first.pid})" in stderr
        assert "Traceback" not in stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # kill -9 leaves the lock file behind, but the OS dropped the lock: the requeued run proceeds.
    assert (out / LOCK_FILE).exists()
    third = _start(
        out,
        synthetic_cache,
        "--resume_from_checkpoint",
        "latest",
        "--warmup_steps",
        "400",
        "--cpsl_steps",
        "0",
        "--stop_at_step",
        str(int(list_checkpoints(out)[-1].name.split("-")[1]) + 1),
    )
    _, stderr = third.communicate(timeout=180)
    assert third.returncode == 0, stderr[-3000:]
    assert not (out / LOCK_FILE).exists()


def test_auto_without_a_checkpoint_is_a_new_run_and_never_overwrites_a_finished_one(
    tmp_path, synthetic_cache
):
    out = tmp_path / "run"
    fresh = run(
        tiny_argv(out, synthetic_cache, "--save_predictions", "0", "--resume_from_checkpoint", "auto")
    )
    assert fresh.step == 4 and not list_checkpoints(out)  # nothing to resume: started fresh, no checkpoints
    with pytest.raises(OutputFolderError, match="holds a run already"):
        run(tiny_argv(out, synthetic_cache, "--save_predictions", "0", "--resume_from_checkpoint", "auto"))
