"""Where the tasks of a multi-node Slurm job meet: the address and port of the first node of the job.

torch.distributed (`env://`) and detectron2 (`--dist-url tcp://HOST:PORT`) both need an address that every
node can reach. The first node's *name* (`SLURM_JOB_NODELIST`, what submitit's TorchDistributedEnvironment
uses) is that address on most clusters, but not where node names are not host names: Slurm's `NodeAddr`
is the address its own daemons use to reach the node, so it is asked first (`scontrol show node`).
The port is derived from the job id, so a requeued job (same id) meets at the same port on every node.
"""
from __future__ import annotations

import os
import random
import subprocess

PORT_RANGE = (20000, 60000)  # submitit's TorchDistributedEnvironment range


def node_address(node: str, timeout: float = 10) -> str:
    """Slurm's NodeAddr for `node`, or `node` itself when scontrol cannot tell."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True,
                             timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return node
    for field in out.stdout.split() if out.returncode == 0 else ():
        key, _, value = field.partition("=")
        if key == "NodeAddr" and value and value != "(null)":
            return value
    return node


def master_port(job_id: str) -> int:
    """The same port for every task of a job and for every requeue of it (seeded by the job id)."""
    return random.Random(str(job_id)).randint(*PORT_RANGE)


def export_torch_env(env) -> dict[str, str]:
    """Set MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE for `env://` from a
    submitit JobEnvironment; returns what was set (also put into os.environ)."""
    values = {"MASTER_ADDR": node_address(env.hostnames[0]), "MASTER_PORT": str(master_port(env.job_id)),
              "RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
              "LOCAL_RANK": str(env.local_rank), "LOCAL_WORLD_SIZE": str(env.num_tasks // env.num_nodes)}
    os.environ.update(values)
    return values


def dist_url(env) -> str:
    """detectron2's `--dist-url` for this job: tcp://first-node-address:port."""
    return f"tcp://{node_address(env.hostnames[0])}:{master_port(env.job_id)}"
