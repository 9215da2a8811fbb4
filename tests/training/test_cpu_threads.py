"""``--cpu_threads auto|N``: the launcher's one-thread fallback is overridden, a user's choice is not; checked on
the resolution rules and in fresh processes under ``accelerate launch``."""

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from cpsl_hf.training.arguments import ConfigurationError, parse_args
from cpsl_hf.training.cpu_threads import choose_cpu_threads, launcher_environment, parse_cpu_threads

REPO = Path(__file__).resolve().parents[2]
LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND": "NO"}


def test_auto_overrides_the_launchers_fallback_of_one_thread():
    choice = choose_cpu_threads("auto", {**LAUNCHED, "OMP_NUM_THREADS": "1"}, launcher_env={}, cores=8)
    assert choice.threads == 8


def test_auto_divides_the_cores_among_the_processes_of_the_node():
    environ = {"TORCHELASTIC_RUN_ID": "x", "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "3"}
    assert choose_cpu_threads("auto", environ, launcher_env={}, cores=8).threads == 2
    environ["LOCAL_WORLD_SIZE"] = "16"
    assert choose_cpu_threads("auto", environ, launcher_env={}, cores=8).threads == 1  # never 0


def test_auto_keeps_a_value_the_user_set():
    # in the launcher's own environment (even 1: the user asked for it)
    launched = {**LAUNCHED, "OMP_NUM_THREADS": "1"}
    assert (
        choose_cpu_threads("auto", launched, launcher_env={"OMP_NUM_THREADS": "1"}, cores=8).threads is None
    )
    # through the launcher (--num_cpu_threads_per_process 4): not the fallback value
    assert choose_cpu_threads("auto", {**LAUNCHED, "OMP_NUM_THREADS": "4"}, {}, cores=8).threads is None
    # without a launcher, in the process's environment
    assert choose_cpu_threads("auto", {"OMP_NUM_THREADS": "1"}, cores=8).threads is None
    # and nothing set without a launcher: all the cores
    assert choose_cpu_threads("auto", {}, cores=8).threads == 8


def test_an_explicit_count_wins_over_everything():
    environ = {**LAUNCHED, "OMP_NUM_THREADS": "2"}
    assert choose_cpu_threads(3, environ, launcher_env={"OMP_NUM_THREADS": "2"}, cores=8).threads == 3


def test_launcher_environment_reads_the_parents_initial_environment(tmp_path):
    assert launcher_environment({}) is None  # no launcher
    # this process's parent is whatever started pytest: its /proc entry is readable and has PATH
    parent = launcher_environment(LAUNCHED)
    assert parent is not None and "PATH" in parent
    assert launcher_environment(LAUNCHED, parent_pid=2**22 + 7) is None  # no such process


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", ""])
def test_bad_values_are_refused_by_name(value, tmp_path):
    with pytest.raises(ValueError, match="--cpu_threads"):
        parse_cpu_threads(value)
    with pytest.raises(ConfigurationError, match="--cpu_threads"):
        parse_args(["--output_dir", str(tmp_path), "--cpu_threads", value])


PROBE = """
import sys, torch
from cpsl_hf.training.cpu_threads import configure_cpu_threads, parse_cpu_threads
threads, reason = configure_cpu_threads(parse_cpu_threads(sys.argv[1]), on_cpu=True)
assert threads == torch.get_num_threads()
print(f"training on {threads} CPU threads ({reason})")
print("threads", torch.get_num_threads())
"""


def launched_threads(tmp_path, setting: str, **parent_env) -> tuple[int, str]:
    """torch's thread count in a fresh process started by ``accelerate launch`` (no accelerate config, as on a
    new machine) with ``parent_env`` in the launcher's environment."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf_home"), **parent_env)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    result = subprocess.run(
        [accelerate, "launch", str(probe), setting], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    return int(lines[-1].split()[1]), "\n".join(lines[:-1])


def test_under_accelerate_launch_auto_uses_the_physical_cores(tmp_path):
    cores = min(psutil.cpu_count(logical=False) or 1, len(os.sched_getaffinity(0)))
    threads, log = launched_threads(tmp_path, "auto")
    assert threads == cores, log
    assert f"training on {cores} CPU threads (auto: {cores} physical cores / 1 local processes)" in log
    # the user's OMP_NUM_THREADS (in the launcher's environment) is kept, even where it equals the fallback
    assert launched_threads(tmp_path, "auto", OMP_NUM_THREADS="1")[0] == 1
    # an explicit count wins over the user's variable
    assert launched_threads(tmp_path, "3", OMP_NUM_THREADS="1")[0] == 3
