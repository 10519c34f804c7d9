"""Start a training module on the processes of its job: as is for one
process, under torchrun for several on one node, and under `srun` + torchrun
(one launcher per node, c10d rendezvous at the first node's address, each node
known by the address SLURM reaches it at) across the nodes of a SLURM job. The
trainers themselves only see torchrun's environment.

    python -m lightning_opd.launch --nproc-per-node 8 lightning_opd.sft --base ...
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

RENDEZVOUS_PORT = 29511
# run the rest of the command line with torchrun's --rdzv-conf is_host=1 on the step's node 0, else 0
HOST_ON_NODE_0 = 'PET_RDZV_CONF="is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0)" exec "$@"'


def scontrol_records(*args: str) -> list[dict[str, str]]:
    """The KEY=VALUE fields of each record (one per line) ``scontrol --oneliner show`` prints."""
    result = subprocess.run(["scontrol", "--oneliner", "show", *args], check=False, capture_output=True, text=True,
                            errors="replace")
    if result.returncode:
        raise RuntimeError(f"scontrol show {' '.join(args)} failed: {result.stderr.strip()}")
    records = []
    for line in result.stdout.splitlines():
        record: dict[str, str] = {}
        for key, _, value in (field.partition("=") for field in line.split() if "=" in field):
            record.setdefault(key, value)  # the record's own field, not a KEY=... inside a later free-text one
        if record:
            records.append(record)
    return records


def node_addresses(nodelist: str) -> dict[str, str]:
    """Each node of a node list such as ``gpu[03-05,07]``, in its order, and the address SLURM reaches it at
    (its NodeAddr; by default the node's name). A site that hides its nodes' records from users: the names."""
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=False, capture_output=True, text=True,
                            errors="replace")
    hosts = result.stdout.split()
    if result.returncode or not hosts:
        raise RuntimeError(f"scontrol could not expand the node list {nodelist!r}: {result.stderr.strip()}")
    try:
        shown = {record.get("NodeName"): record.get("NodeAddr") for record in scontrol_records("node", nodelist)}
    except RuntimeError:
        shown = {}
    return {host: shown.get(host) or host for host in hosts}


def node_wrapper(addresses: dict[str, str]) -> str:
    """The sh script srun runs on every node before torchrun: the node's own address as torchrun's
    --local-addr (PET_LOCAL_ADDR, by SLURMD_NODENAME), and is_host=1 on the step's node 0 only.

    The rendezvous' rank 0 publishes its --local-addr as the workers' MASTER_ADDR (default: its own
    getfqdn(), which need not resolve on the other nodes); torchrun's guess of which node hosts the store
    compares the endpoint with the addresses of the machine's host name, which an address on another
    network (or a `127.0.1.1 <host>` line) fails on every node."""
    cases = " ".join(f"{shlex.quote(name)}) export PET_LOCAL_ADDR={shlex.quote(address)};;"
                     for name, address in addresses.items())
    unknown = '*) unset PET_LOCAL_ADDR; echo "launch: no address known for node $SLURMD_NODENAME" >&2;;'
    return f'case "$SLURMD_NODENAME" in {cases} {unknown} esac; {HOST_ON_NODE_0}'


def job_nodes(env: dict[str, str]) -> tuple[int, str]:
    """The SLURM job's node count and node list: from its environment, else from ``scontrol show job``
    (Snakemake's SLURM jobstep plugin keeps no SLURM variable but the job id in a job's environment)."""
    if "SLURM_NNODES" in env and "SLURM_JOB_NODELIST" in env:
        return int(env["SLURM_NNODES"]), env["SLURM_JOB_NODELIST"]
    job = env["SLURM_JOB_ID"]
    fields = next(iter(scontrol_records("job", job)), {})
    if "NumNodes" not in fields or "NodeList" not in fields:
        raise RuntimeError(f"scontrol shows no nodes for SLURM job {job}: {fields}")
    return int(fields["NumNodes"].split("-")[0]), fields["NodeList"]


def command(module: str, args: list[str], nproc_per_node: int, nnodes: int, env: dict[str, str]) -> list[str]:
    python = [sys.executable, "-m"]
    if nproc_per_node * nnodes == 1:
        return [*python, module, *args]
    torchrun = [*python, "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1:
        return [*torchrun, "--standalone", "-m", module, *args]
    if "SLURM_JOB_ID" not in env:
        raise RuntimeError(f"training on {nnodes} nodes needs a SLURM job (it starts one launcher per node with srun)")
    held, nodelist = job_nodes(env)
    if held != nnodes:
        raise RuntimeError(f"the config asks for {nnodes} nodes but this SLURM job has {held}")
    addresses = node_addresses(nodelist)
    head = next(iter(addresses.values()))
    # --overlap: the job step that runs this launcher already holds the allocation; its node 0 (the first
    # of the list) hosts the rendezvous store
    return ["srun", "--overlap", f"--nodes={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            "sh", "-c", node_wrapper(addresses), "sh", *torchrun,
            f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={head}:{RENDEZVOUS_PORT}",
            f"--rdzv-id={env['SLURM_JOB_ID']}", "-m", module, *args]


def one_device_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of a one-process job on GPUs, with one GPU visible: the first of those the job was
    given (CUDA_VISIBLE_DEVICES, as SLURM sets it), or GPU 0 where none were named. With several visible,
    transformers' Trainer would wrap the model in DataParallel, which the trainers' chunked losses do not
    support (and which would multiply the batch)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    first = "0" if visible is None else visible.split(",")[0].strip()
    return {**env, "CUDA_VISIBLE_DEVICES": first} if first else dict(env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc-per-node", type=int, default=1, help="training processes per node (GPUs per node)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes of the job")
    parser.add_argument("--gpus-per-node", type=int, default=0,
                        help="GPUs the job holds per node; a one-process job on GPUs sees one of them")
    parser.add_argument("module", help="the training module, e.g. lightning_opd.sft")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    if args.nproc_per_node < 1 or args.nnodes < 1:
        parser.error("--nproc-per-node and --nnodes must be at least 1")
    env = dict(os.environ)
    cmd = command(args.module, args.args, args.nproc_per_node, args.nnodes, env)
    if args.gpus_per_node and args.nproc_per_node * args.nnodes == 1:
        env = one_device_env(env)
        print(f"launch: one process: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}", flush=True)
    print("launch:", " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
