"""Run a multi-process command (torchrun and its workers, or Snakemake and its
jobs) for a test, and if it runs past its time, fail with the Python stack of
every process under it rather than a bare timeout: a hung collective shows
where each rank waits.

Each process gets PYTHONFAULTHANDLER=1, so SIGABRT makes it print the stacks
of all its threads to stderr before it dies. Only Python processes get the
SIGABRT: a job's shell and its `tee` stay up to carry the stacks into the
job's log and Snakemake's output. The whole session is killed after."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest


def run_or_show_stacks(command: list[str], *, env: dict[str, str], timeout: float,
                       cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    process = subprocess.Popen(command, env={**env, "PYTHONFAULTHANDLER": "1"}, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _abort_with_stacks(process)
        pytest.fail(f"{' '.join(command[:6])} ... ran past {timeout:.0f} s; the stacks of its processes "
                    f"(faulthandler on SIGABRT):\n{stderr[-20000:]}\nstdout (a Snakemake job's stacks are here):\n"
                    f"{stdout[-20000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _abort_with_stacks(process: subprocess.Popen) -> tuple[str, str]:
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    workers = [p for p in tree if _is_python(p)]
    for worker in reversed(workers):  # the workers before their launcher, which would otherwise stop them first
        _abort(worker)
    # the launcher ends once it sees its workers end; if it does not, it hangs itself: its stack too
    if _still_running(process, 5 if workers else 0):
        _abort(psutil.Process(process.pid))
        _still_running(process, 5)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and any worker it left behind
    except ProcessLookupError:
        pass
    return process.communicate()


def _still_running(process: subprocess.Popen, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return process.poll() is None


def _is_python(child: psutil.Process) -> bool:
    """A Python interpreter (torchrun, a worker, Snakemake): a script started by its #! line runs under one."""
    try:
        command = child.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return bool(command) and os.path.basename(command[0]).startswith("python")


def _abort(child: psutil.Process) -> None:
    try:
        child.send_signal(signal.SIGABRT)
    except psutil.NoSuchProcess:
        pass
