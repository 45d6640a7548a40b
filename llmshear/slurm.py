"""The ``composer`` launcher command of one SLURM node, from SLURM's environment.

One SLURM task per node runs :func:`launch_command`'s command; the ``composer`` launcher then starts one
process per GPU of that node. World size, node rank and the master address come from SLURM:

======================  ===========================================================================
launcher argument       source
======================  ===========================================================================
``--nproc``             ``LLMSHEAR_GPUS_PER_NODE``, else ``SLURM_GPUS_ON_NODE``, else ``SLURM_GPUS_PER_NODE``
``--world_size``        nodes (``SLURM_JOB_NUM_NODES`` / ``SLURM_NNODES``) × ``--nproc``
``--node_rank``         ``SLURM_NODEID``
``--master_addr``       ``MASTER_ADDR`` (the sbatch files set it from ``scontrol show hostnames``), else the
                        first host of ``SLURM_JOB_NODELIST`` (:func:`expand_hostlist`)
``--master_port``       ``MASTER_PORT``, else 20000 + ``SLURM_JOB_ID`` mod 10000 (distinct per job)
``--stdout/--stderr``   ``LLMSHEAR_LOG_DIR/rank{rank}.stdout.txt`` / ``.stderr.txt`` when that is set: every
                        rank but each node's local rank 0 (which writes to the job's output) gets its own
======================  ===========================================================================
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping, Sequence

BASE_PORT = 20000
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # preemption; ``#SBATCH --signal=USR1@...`` before the time limit
PREEMPTED_STATUS = 75  # EX_TEMPFAIL (sysexits.h): a run stopped by one of them with a checkpoint; run it again


class SlurmEnvironmentError(RuntimeError):
    """A SLURM variable the launch needs is missing or malformed; the message names it."""


def _expand_group(group: str, nodelist: str) -> list[str]:
    """``001-003,010`` → ``['001', '002', '003', '010']`` (zero padding kept from the range's start)."""
    values = []
    for part in group.split(","):
        start, _, stop = part.partition("-")
        if not start.isdigit() or (stop and not stop.isdigit()) or (stop and int(stop) < int(start)):
            raise SlurmEnvironmentError(f"SLURM_JOB_NODELIST={nodelist!r}: bad range {part!r}")
        values += [str(i).zfill(len(start)) for i in range(int(start), int(stop or start) + 1)]
    return values


def _split_top_level(nodelist: str) -> list[str]:
    """Split at the commas outside brackets: ``a[1,2],b`` → ``['a[1,2]', 'b']``."""
    items, depth, current = [], 0, ""
    for char in nodelist:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return items + [current]


def expand_hostlist(nodelist: str) -> list[str]:
    """Every host of a SLURM node list, in order, as ``scontrol show hostnames`` prints them.

    ``rack[1-2]-gpu[01-02]`` → rack1-gpu01, rack1-gpu02, rack2-gpu01, rack2-gpu02; ``node[001-004,010]``,
    ``a1,b[3-4]`` and single hosts work too.

    Raises:
        SlurmEnvironmentError: an empty list, unbalanced brackets or a malformed range (the list is named).
    """
    hosts = []
    for item in _split_top_level(nodelist.strip()):
        pieces = re.split(r"\[([^\[\]]*)\]", item)  # literal, group, literal, group, ..., literal
        if not item or any(c in piece for piece in pieces[::2] for c in "[]"):
            raise SlurmEnvironmentError(f"SLURM_JOB_NODELIST={nodelist!r} is not a node list")
        expanded = [""]
        for i, piece in enumerate(pieces):
            options = _expand_group(piece, nodelist) if i % 2 else [piece]
            expanded = [prefix + option for prefix in expanded for option in options]
        hosts += expanded
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` → ``gpu07``."""
    return expand_hostlist(nodelist)[0]


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
    logs = env.get("LLMSHEAR_LOG_DIR")
    log_args = ["--stdout", f"{logs}/rank{{rank}}.stdout.txt", "--stderr", f"{logs}/rank{{rank}}.stderr.txt"] \
        if logs else []
    return [launcher, "--nproc", str(gpus), "--world_size", str(nodes * gpus), "--node_rank", str(node_rank),
            "--master_addr", master_addr, "--master_port", master_port, *log_args, script, *args]
