"""The code is ruff-clean (rules and line length in pyproject.toml) and the workflow is
formatted as snakefmt formats it (line length in pyproject.toml)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_pipeline import REPO

BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_is_clean():
    result = run(str(BIN / "ruff"), "check", "--no-cache", "src", "tests", "bench")
    assert result.returncode == 0, (
        f"`ruff check src tests bench` (fix with `ruff check --fix`):\n{result.stdout}{result.stderr}"
    )


def test_snakefmt_is_clean():
    result = run(str(BIN / "snakefmt"), "--check", "--diff", "workflow")
    assert result.returncode == 0, (
        f"`snakefmt --check workflow` (fix with `snakefmt workflow`):\n{result.stdout}{result.stderr}"
    )
