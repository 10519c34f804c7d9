"""Run a multi-process command (torchrun and its workers) for a test, and if it
runs past its time, fail with the Python stack of every process under it
rather than a bare timeout: a hung collective shows where each rank waits.

Each process gets PYTHONFAULTHANDLER=1, so SIGABRT makes it print the stacks
of all its threads to stderr before it dies; the whole session is killed after."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest


def run_or_show_stacks(command: list[str], *, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    process = subprocess.Popen(command, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _abort_with_stacks(process)
        pytest.fail(f"{' '.join(command[:6])} ... ran past {timeout:.0f} s; the stacks of its processes "
                    f"(faulthandler on SIGABRT):\n{stderr[-20000:]}\nstdout:\n{stdout[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _abort_with_stacks(process: subprocess.Popen) -> tuple[str, str]:
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for worker in reversed(tree):  # the workers before their launcher, which would otherwise stop them first
        _abort(worker)
    # the launcher ends once it sees its workers end; if it does not, it hangs itself: its stack too
    if _still_running(process, 5 if tree else 0):
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


def _abort(child: psutil.Process) -> None:
    try:
        child.send_signal(signal.SIGABRT)
    except psutil.NoSuchProcess:
        pass
