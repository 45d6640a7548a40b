"""The ``composer`` launcher command of one SLURM node, from SLURM's environment.

One SLURM task per node runs :func:`launch_command`'s command; the ``composer`` launcher then starts one
process per GPU of that node. World size, node rank and the master address come from SLURM:

======================  ===========================================================================
launcher argument       source
======================  ===========================================================================
``--nproc``             ``LLMSHEAR_GPUS_PER_NODE``, else ``SLURM_GPUS_ON_NODE``, else ``SLURM_GPUS_PER_NODE``
``--world_size``        nodes (``SLURM_JOB_NUM_NODES`` / ``SLURM_NNODES``) × ``--nproc``
``--node_rank``         ``SLURM_NODEID``
``--master_addr``       ``MASTER_ADDR``, else the first host of ``SLURM_JOB_NODELIST``
``--master_port``       ``MASTER_PORT``, else 20000 + ``SLURM_JOB_ID`` mod 10000 (distinct per job)
======================  ===========================================================================
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

BASE_PORT = 20000


class SlurmEnvironmentError(RuntimeError):
    """A SLURM variable the launch needs is missing or malformed; the message names it."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` → ``gpu07``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise SlurmEnvironmentError(f"SLURM_JOB_NODELIST={nodelist!r} is not a node list")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def _integer(env: Mapping[str, str], *names: str) -> int:
    """The first of ``names`` set in ``env``, as an integer (``a100:8`` → 8)."""
    for name in names:
        if env.get(name):
            value = env[name].rsplit(":", 1)[-1].split("(")[0]
            if not value.isdigit():
                raise SlurmEnvironmentError(f"{name}={env[name]!r} is not a count")
            return int(value)
    raise SlurmEnvironmentError(f"none of {', '.join(names)} is set: run this inside a SLURM job (sbatch/srun)")


def launch_command(env: Mapping[str, str], launcher: str, script: str, args: Sequence[str]) -> list[str]:
    """The launcher command line for this node.

    Args:
        env: the environment (``os.environ`` inside a SLURM task).
        launcher: the ``composer`` executable.
        script: the training script (``train.py``).
        args: the script's arguments (recipe and ``key=value`` overrides).

    Raises:
        SlurmEnvironmentError: naming a missing or malformed variable.
    """
    nodes = _integer(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    gpus = _integer(env, "LLMSHEAR_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")
    node_rank = _integer(env, "SLURM_NODEID")
    if node_rank >= nodes:
        raise SlurmEnvironmentError(f"SLURM_NODEID={node_rank} is not below the node count {nodes}")
    master_addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", ""))
    master_port = env.get("MASTER_PORT") or str(BASE_PORT + _integer(env, "SLURM_JOB_ID") % 10000)
    return [launcher, "--nproc", str(gpus), "--world_size", str(nodes * gpus), "--node_rank", str(node_rank),
            "--master_addr", master_addr, "--master_port", master_port, script, *args]
