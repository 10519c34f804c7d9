"""Multi-process training for real on CPU: two processes (torchrun, gloo)
on the same global batch train the same model as one process, for Lightning
OPD (our loss, normalised over the whole optimiser step) and for SFT (the
model's own loss), with padding, packing and gradient accumulation."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightning_opd import launch
from lightning_opd.artifacts import METADATA_KEY, write_table
from lightning_opd.hparams import ArchParams, OPDParams, TrainParams
from lightning_opd.modeling import load_tokenizer, tiny_qwen3_config
from lightning_opd.provenance import read_train_log
from lightning_opd.training import accumulation
from torchrun import run_or_show_stacks

# plain SGD: the update is the gradient itself, so equal updates mean equal gradients
# (Adam's first steps turn float noise on near-zero gradients into +-lr)
STEPS = {"max_steps": 3, "batch_size": 4, "learning_rate": 0.05, "warmup_ratio": 0.0, "optim": "sgd",
         "save_steps": 100, "logging_steps": 1}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch_module(nproc: int, module: str, *args: str) -> str:
    result = run_or_show_stacks([sys.executable, "-m", "lightning_opd.launch", "--nproc-per-node", str(nproc), module,
                                 *args], env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def max_weight_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def tokens_logged(model_dir: Path) -> list[tuple[float, float]]:
    return [(e["tokens_per_step"], e["response_tokens_per_step"]) for e in read_train_log(model_dir) if "loss" in e]


def step_logs(model_dir: Path) -> list[float]:
    """Loss and gradient norm of every step, as logged (averaged over processes)."""
    return [e[key] for e in read_train_log(model_dir) if "loss" in e for key in ("loss", "grad_norm")]


OPD_METRICS = ("reverse_kl", "advantage", "teacher_logprob", "student_logprob", "clip_fraction")


def opd_metrics(model_dir: Path) -> list[float]:
    """The OPD metrics of every step, as logged: means over the response tokens of all processes."""
    return [e[key] for e in read_train_log(model_dir) if "loss" in e for key in OPD_METRICS]


@pytest.fixture(scope="module")
def uneven_cache(world, tmp_path_factory) -> Path:
    """The teacher cache with responses cut to different lengths (2..12
    tokens), so a per-process mean of the loss would differ from the global one."""
    table = pq.read_table(world["cache_A"])
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        keep = 2 + (i * 7) % 11
        row["response_ids"], row["teacher_logprobs"] = row["response_ids"][:keep], row["teacher_logprobs"][:keep]
    assert len({len(r["response_ids"]) for r in rows}) > 4 and len(rows) == 12  # 3 full batches of 4
    path = tmp_path_factory.mktemp("uneven") / "cache.parquet"
    write_table(path, rows, table.schema.remove_metadata(), json.loads(table.schema.metadata[METADATA_KEY]))
    return path


def lightning_opd(world, cache: Path, out: Path, nproc: int, **opd) -> str:
    return launch_module(nproc, "lightning_opd.lightning_opd", "--init", str(world["sft_A"]), "--cache", str(cache),
                         "--opd", json.dumps({**STEPS, "tau": 1.0, **opd}), "--out", str(out),
                         "--checkpoint-root", str(out.parent / f"{out.name}-ckpt"), "--drift-n", "0")


@pytest.fixture(scope="module")
def one_process_opd(world, uneven_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "model"
    assert "one process: 1 x micro-batch 4 x 1 accumulation" in lightning_opd(world, uneven_cache, out, 1)
    return out


@pytest.mark.parametrize("opd, layout", [
    ({}, "DDP: 2 x micro-batch 2 x 1 accumulation"),
    ({"micro_batch_size": 1, "packing": True}, "DDP: 2 x micro-batch 1 x 2 accumulation"),
    ({"packing": True, "gradient_checkpointing": True}, "DDP: 2 x micro-batch 2 x 1 accumulation"),
], ids=["padded", "packed+accumulation", "packed+checkpointing"])
def test_lightning_opd_on_two_processes_equals_one(world, uneven_cache, one_process_opd, tmp_path, opd, layout):
    out = tmp_path / "model"
    assert layout in lightning_opd(world, uneven_cache, out, 2, **opd)
    moved = max_weight_diff(one_process_opd, world["sft_A"])
    assert moved > 1e-3  # training changed the model well above the tolerance below
    assert max_weight_diff(out, one_process_opd) < 1e-6
    assert step_logs(out) == pytest.approx(step_logs(one_process_opd), rel=1e-4, abs=1e-6)
    assert tokens_logged(out) == tokens_logged(one_process_opd)  # summed over the processes
    # token means over both processes' micro-batches of uneven lengths: those of the one process's
    assert opd_metrics(out) == pytest.approx(opd_metrics(one_process_opd), rel=1e-4, abs=1e-6)


def test_logged_tokens_per_step_add_up_to_the_cache(one_process_opd, uneven_cache):
    rows = pq.read_table(uneven_cache).to_pylist()
    logged = tokens_logged(one_process_opd)
    assert len(logged) == 3  # one log per step, 12 rows in steps of 4
    assert sum(t for t, _ in logged) == sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows)
    assert sum(r for _, r in logged) == sum(len(r["response_ids"]) for r in rows)


def test_sft_on_two_processes_equals_one(world, tmp_path):
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"sft-{nproc}"
        launch_module(nproc, "lightning_opd.sft", "--base", str(world["student_base"]), "--sft-data",
                      str(world["root"] / "sft_data-A.parquet"), "--keep-unfinished",
                      "--train", json.dumps({**STEPS, "micro_batch_size": 1, "packing": nproc == 2}),
                      "--out", str(outs[nproc]), "--checkpoint-root", str(tmp_path / f"ckpt-{nproc}"))
    assert max_weight_diff(outs[1], world["student_base"]) > 1e-3
    assert max_weight_diff(outs[1], outs[2]) < 1e-6
    assert step_logs(outs[2]) == pytest.approx(step_logs(outs[1]), rel=1e-4)


def test_accumulation_makes_up_the_global_batch():
    assert accumulation(TrainParams(batch_size=256, micro_batch_size=4), 8) == (4, 8)
    assert accumulation(TrainParams(batch_size=64), 1) == (64, 1)
    assert accumulation(TrainParams(batch_size=64), 2) == (32, 1)
    # the OPD default of 32 sequences a pass: 8 passes a step of 256; a batch of 8 on 2 processes is one pass of 4
    assert accumulation(OPDParams(batch_size=256), 1) == (32, 8)
    assert accumulation(OPDParams(batch_size=8), 2) == (4, 1)
    with pytest.raises(ValueError, match="batch_size 256 is not a multiple of micro_batch_size 3 x 8 processes"):
        accumulation(TrainParams(batch_size=256, micro_batch_size=3), 8)


def test_launch_command():
    python = [sys.executable, "-m"]
    assert launch.command("lightning_opd.sft", ["--x", "1"], 1, 1, {}) == [*python, "lightning_opd.sft", "--x", "1"]
    assert launch.command("m", [], 8, 1, {}) == [*python, "torch.distributed.run", "--nproc-per-node=8",
                                                 "--standalone", "-m", "m"]
    with pytest.raises(RuntimeError, match="needs a SLURM job"):
        launch.command("m", [], 8, 2, {})
    with pytest.raises(RuntimeError, match="asks for 2 nodes but this SLURM job has 1"):
        launch.command("m", [], 8, 2, {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1"})


def test_a_job_without_its_slurm_variables_finds_its_nodes_with_scontrol(tmp_path, monkeypatch):
    """Snakemake's SLURM jobstep plugin keeps only the job id of a job's SLURM variables: the launcher asks
    scontrol for the job's nodes and their addresses (here a stand-in scontrol that prints what SLURM
    22.05's does)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        'if [ "$2" = hostnames ]; then printf "gpu03\\ngpu04\\n"; exit 0; fi\n'
        'if [ "$3" = node ] && [ "$4" = "gpu[03-04]" ]; then\n'
        '  echo "NodeName=gpu03 Arch=x86_64 NodeAddr=10.1.0.3 NodeHostName=gpu03 OS=Linux 6.1.0 #1 SMP"\n'
        # a free-text Reason with a KEY=... of its own and a byte that is not UTF-8
        '  printf "NodeName=gpu04 Arch=x86_64 NodeAddr=10.1.0.4 NodeHostName=gpu04 "\n'
        '  printf "Reason=m\\377ved NodeAddr=x [root]\\n"\n'
        '  exit 0; fi\n'
        'echo "JobId=$4 JobName=sft UserId=u(1) JobState=RUNNING NumNodes=2 NumCPUs=32 NodeList=gpu[03-04] '
        'BatchHost=gpu03"\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert launch.job_nodes({"SLURM_JOB_ID": "7"}) == (2, "gpu[03-04]")
    assert launch.node_addresses("gpu[03-04]") == {"gpu03": "10.1.0.3", "gpu04": "10.1.0.4"}
    cmd = launch.command("m", ["--a"], 8, 2, {"SLURM_JOB_ID": "7"})
    # the launchers meet at the address SLURM reaches the first node at (NodeAddr), not at its name,
    # and each node is known to the others by its own NodeAddr
    assert cmd[:3] == ["srun", "--overlap", "--nodes=2"] and f"--rdzv-endpoint=10.1.0.3:{launch.RENDEZVOUS_PORT}" in cmd
    assert cmd[5:9] == ["sh", "-c", launch.node_wrapper({"gpu03": "10.1.0.3", "gpu04": "10.1.0.4"}), "sh"], cmd
    with pytest.raises(RuntimeError, match="asks for 3 nodes but this SLURM job has 2"):
        launch.command("m", [], 8, 3, {"SLURM_JOB_ID": "7"})
    # a site that hides its nodes' records: the nodes' names
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        'if [ "$2" = hostnames ]; then printf "gpu03\\ngpu04\\n"; exit 0; fi\n'
        'echo "scontrol: error: Invalid user for SlurmUser" >&2; exit 1\n')
    assert launch.node_addresses("gpu[03-04]") == {"gpu03": "gpu03", "gpu04": "gpu04"}
    assert launch.job_nodes({"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1"}) == (1, "n1")


def test_each_node_gets_its_own_address_and_only_the_first_hosts_the_rendezvous():
    """srun runs the same torchrun on every node; the wrapper gives each node its own address as torchrun's
    --local-addr (the rendezvous' rank 0 publishes it as the workers' MASTER_ADDR), and tells node 0 (the
    first of the job's list, where the endpoint points) to host the store and every other node to connect."""
    wrapper = launch.node_wrapper({"n1": "10.0.0.1", "n 2": "10.0.0.2", "n3": "it's"})
    show = 'echo "$PET_RDZV_CONF ${PET_LOCAL_ADDR-unset} $1"'
    # a node the map lacks gets no address (not one inherited from the launcher's environment) and says so
    for node, name, is_host, address in (("0", "n1", "1", "10.0.0.1"), ("1", "n 2", "0", "10.0.0.2"),
                                         ("3", "n3", "0", "it's"), ("2", "n4", "0", "unset")):
        out = subprocess.run(["sh", "-c", wrapper, "sh", "sh", "-c", show, "sh", "arg with space"],
                             env={**ENV, "SLURM_NODEID": node, "SLURMD_NODENAME": name, "PET_LOCAL_ADDR": "inherited"},
                             capture_output=True, text=True, check=True)
        assert out.stdout == f"is_host={is_host} {address} arg with space\n", (node, out.stdout)
        assert ("no address known for node n4" in out.stderr) == (name == "n4"), out.stderr


def test_a_one_process_job_on_gpus_sees_one_of_them(tmp_path):
    """With several GPUs visible, transformers' Trainer wraps a one-process model in DataParallel (which the
    chunked losses do not support, and which multiplies the batch): the launcher shows it the first one."""
    assert launch.one_device_env({"X": "1"}) == {"X": "1", "CUDA_VISIBLE_DEVICES": "0"}
    assert launch.one_device_env({"CUDA_VISIBLE_DEVICES": "3,5"}) == {"CUDA_VISIBLE_DEVICES": "3"}
    assert launch.one_device_env({"CUDA_VISIBLE_DEVICES": ""}) == {"CUDA_VISIBLE_DEVICES": ""}
    (tmp_path / "show_devices.py").write_text("import os; print('visible:', os.environ.get('CUDA_VISIBLE_DEVICES'))")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "2,3"}

    def visible(*flags):
        result = subprocess.run([sys.executable, "-m", "lightning_opd.launch", *flags, "show_devices"], env=env,
                                capture_output=True, text=True, check=True)
        return result.stdout.splitlines()[-1]

    assert visible("--gpus-per-node", "4") == "visible: 2"
    assert visible() == "visible: 2,3"  # a CPU job: left as it is


def test_sharded_frozen_model_scores_and_samples_like_the_whole_one(world, tmp_path):
    # the live teacher and pi_ref under FSDP: rank 0 loads, rank 1 builds on meta, FSDP2 shards (gloo on CPU);
    # a model of ~100 MB so that a full copy on rank 1 would show in its memory
    tokenizer = load_tokenizer(world["teacher_A"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_qwen3_config(ArchParams(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64, max_position_embeddings=256), tokenizer)).save_pretrained(tmp_path / "model")
    result = run_or_show_stacks([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                                 str(Path(__file__).with_name("check_sharded_frozen.py")), str(tmp_path / "model"),
                                 str(world["rollouts"]), str(world["teacher_B"])],
                                env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("sharded scoring, sampling, gradients and drift match the whole model") == 2


def test_trained_model_loads_through_accelerates_fsdp2_without_a_full_copy_per_rank(world, tmp_path):
    # the trained model under FSDP2 as the Trainer prepares it on GPUs (rank 0 loads, rank 1 builds on meta,
    # accelerate's fsdp2_prepare_model shards and broadcasts), on CPU with gloo; a ~100 MB model.
    # glibc's default malloc raises its mmap threshold as the per-parameter broadcast buffers are freed and
    # then keeps their pages beside the shards (rank 1's RSS grew by the model's size though it held no
    # copy); a fixed threshold returns freed buffers, so that RSS shows what the process holds
    tokenizer = load_tokenizer(world["teacher_A"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_qwen3_config(ArchParams(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64, max_position_embeddings=256), tokenizer)).save_pretrained(tmp_path / "model")
    result = run_or_show_stacks([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                                 str(Path(__file__).with_name("check_fsdp2_loading.py")), str(tmp_path / "model"),
                                 str(world["cache_A"])],
                                env={**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("accelerate's FSDP2 loading matches the whole model and its step") == 2


def test_a_hung_run_fails_with_the_stack_of_every_rank(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import os, time\nimport torch.distributed as dist\n"
                      "dist.init_process_group('gloo')\n"
                      "def wait_forever():\n    time.sleep(3600)\n"
                      "dist.barrier() if os.environ['RANK'] == '0' else wait_forever()\n")
    with pytest.raises(pytest.fail.Exception) as failure:
        run_or_show_stacks([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                            str(script)], env=ENV, timeout=30)
    message = str(failure.value)
    assert "ran past 30 s" in message
    assert f'File "{script}", line 6 in <module>' in message and "line 5 in wait_forever" in message


def test_a_hung_launcher_fails_with_its_own_stack(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\ndef wait_forever():\n    time.sleep(3600)\nwait_forever()\n")
    with pytest.raises(pytest.fail.Exception, match=r'(?s)ran past 5 s.*line 3 in wait_forever'):
        run_or_show_stacks([sys.executable, str(script)], env=ENV, timeout=5)


def test_a_hung_job_of_a_shell_pipeline_shows_its_stack_through_tee(tmp_path):
    """As a Snakemake job runs: `python ... 2>&1 | tee log` in a shell. The job's stack reaches the output and
    the log through `tee`, which the helper leaves running until the Python processes have printed."""
    script, log = tmp_path / "hang.py", tmp_path / "job.log"
    script.write_text("import time\ndef wait_forever():\n    time.sleep(3600)\nwait_forever()\n")
    with pytest.raises(pytest.fail.Exception) as failure:
        run_or_show_stacks(["bash", "-c", f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} 2>&1 "
                                          f"| tee {shlex.quote(str(log))}"], env=ENV, timeout=5)
    stdout = str(failure.value).split("stdout (a Snakemake job's stacks are here):")[1]
    assert f'File "{script}", line 3 in wait_forever' in stdout
    assert f'File "{script}", line 3 in wait_forever' in log.read_text()
