"""Run a multi-process command (torchrun and its workers, or Snakemake and its
jobs) for a test, and if it runs past its time, fail with the Python stack of
every process under it rather than a bare timeout: a hung collective shows
where each rank waits.

Each process gets PYTHONFAULTHANDLER=1, so SIGABRT makes it print the stacks
of all its threads to stderr before it dies. Only Python processes get the
SIGABRT, one at a time while the others are stopped: a job's shell and its
`tee` stay up to carry the stacks into the job's log and Snakemake's output.
The whole session is killed after."""
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
        launcher = psutil.Process(process.pid)
        tree = launcher.children(recursive=True)
    except psutil.NoSuchProcess:
        launcher, tree = None, []
    workers = [p for p in tree if _is_python(p)]
    # Stop them all first: then no rank reacts to another's end (a rank whose peer died leaves its
    # collective with an exception, a launcher stops its other workers), and each prints its stack
    # whole, one after the other (two at once interleave on a shared stderr, byte by byte).
    for child in [*workers, *([launcher] if launcher is not None and _is_python(launcher) else [])]:
        _signal(child, signal.SIGSTOP)
    for worker in reversed(workers):  # the workers before their launcher, which would otherwise stop them first
        _signal(worker, signal.SIGABRT)  # delivered first on SIGCONT: a pending SIGTERM has a higher number
        _signal(worker, signal.SIGCONT)
        _wait_gone(worker, 5)
    if launcher is not None:
        _signal(launcher, signal.SIGCONT)
    # the launcher ends once it sees its workers end; if it does not, it hangs itself: its stack too
    if launcher is not None and _still_running(process, 5 if workers else 0):
        _signal(launcher, signal.SIGABRT)
        _still_running(process, 5)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and any worker it left behind
    except ProcessLookupError:
        pass
    return process.communicate()


def _wait_gone(child: psutil.Process, seconds: float) -> None:
    """Until ``child`` has exited (a zombie counts: its parent may be stopped) or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)


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


def _signal(child: psutil.Process, signum: int) -> None:
    try:
        child.send_signal(signum)
    except psutil.NoSuchProcess:
        pass
