"""Killing training midway and rerunning resumes from the last checkpoint,
and ends with the same weights as a run that was never interrupted."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lightning_opd.provenance import read_train_log

ARCH = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32}
TRAIN = {"max_steps": 24, "batch_size": 16, "save_steps": 4, "logging_steps": 1, "learning_rate": 1e-3,
         "lr_scheduler_type": "constant", "warmup_ratio": 0.0}


def pretrain_command(world, out: Path, ckpt: Path) -> list[str]:
    return [sys.executable, "-m", "lightning_opd.pretrain", "--tokenizer", str(world["tokenizer"]),
            "--task-file", str(world["data"] / "teacher.parquet"), "--corpus", "solutions",
            "--arch", json.dumps(ARCH), "--train", json.dumps(TRAIN), "--out", str(out), "--checkpoint-root", str(ckpt)]


def test_kill_and_rerun_resumes_from_last_checkpoint(world, tmp_path):
    ckpt = tmp_path / "ckpt"
    command = pretrain_command(world, tmp_path / "model", ckpt)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240

    def saved_steps():
        return sorted(int(p.name.split("-")[1]) for p in ckpt.glob("*/checkpoint-*"))

    while not any(step >= 8 for step in saved_steps()) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "model").exists(), "killed before the end: no final model may exist"
    saved = saved_steps()
    assert saved and max(saved) < TRAIN["max_steps"], f"expected a midway checkpoint, found {saved}"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {ckpt}" in rerun.stdout
    log_steps = [e["step"] for e in read_train_log(tmp_path / "model") if "loss" in e]
    assert log_steps[-1] == TRAIN["max_steps"]
    assert not ckpt.exists() or not any(ckpt.iterdir()), "checkpoints are dropped after the final save"

    straight = subprocess.run(pretrain_command(world, tmp_path / "straight", tmp_path / "ckpt2"),
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed = load_file(tmp_path / "model" / "model.safetensors")
    uninterrupted = load_file(tmp_path / "straight" / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-5)
