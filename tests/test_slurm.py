"""The multi-node launch: the composer command rendered from a simulated SLURM job of 2 nodes x 8 GPUs."""

import os
import subprocess
import sys

import pytest

from llmshear.slurm import SlurmEnvironmentError, first_host, launch_command

JOB = {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu[07-08]",
       "SLURM_JOB_ID": "123456"}


def test_two_nodes_of_eight_gpus():
    commands = [launch_command({**JOB, "SLURM_NODEID": str(node)}, "composer", "train.py",
                               ["yaml/prune_1.3b.yaml", "train.micro_batch_size=2"]) for node in (0, 1)]
    for node, command in enumerate(commands):
        assert command == ["composer", "--nproc", "8", "--world_size", "16", "--node_rank", str(node),
                           "--master_addr", "gpu07", "--master_port", "23456", "train.py",
                           "yaml/prune_1.3b.yaml", "train.micro_batch_size=2"]


@pytest.mark.parametrize(("nodelist", "host"), [("gpu[07-08]", "gpu07"), ("a1,a2", "a1"), ("n[3,5-6],m1", "n3"),
                                                ("single", "single")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_explicit_master_and_gpu_count_win():
    env = {**JOB, "SLURM_NODEID": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
           "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "a100:4"}
    command = launch_command(env, "composer", "train.py", [])
    assert command[1:11] == ["--nproc", "4", "--world_size", "8", "--node_rank", "1", "--master_addr", "10.0.0.1",
                             "--master_port", "29400"]


@pytest.mark.parametrize(("drop", "name"), [("SLURM_NODEID", "SLURM_NODEID"), ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"),
                                            ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")])
def test_missing_variable_is_named(drop, name):
    env = {k: v for k, v in {**JOB, "SLURM_NODEID": "0"}.items() if k != drop}
    with pytest.raises(SlurmEnvironmentError, match=name):
        launch_command(env, "composer", "train.py", [])


def test_sbatch_script_launches_one_composer_per_node(repo_root, tmp_path):
    """Run the sbatch file with a stand-in ``srun`` that plays both nodes with ``--dry-run``."""
    srun = tmp_path / "srun"
    srun.write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                    'for n in 0 1; do SLURM_NODEID=$n "$@" --dry-run || exit 1; done\n')
    srun.chmod(0o755)
    env = {**os.environ, **JOB, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "SLURM_SUBMIT_DIR": str(repo_root)}
    for kind in ("prune", "continue"):
        result = subprocess.run(["bash", str(repo_root / "scripts" / "slurm" / f"{kind}.sbatch"), "yaml/x.yaml",
                                 "seed=3"], env=env, capture_output=True, text=True, check=True)
        lines = result.stdout.splitlines()
        assert len(lines) == 2
        for node, line in enumerate(lines):
            assert f"--world_size 16 --node_rank {node} --master_addr gpu07" in line
            assert line.endswith(f"{repo_root}/train.py yaml/x.yaml seed=3")
    usage = subprocess.run(["bash", str(repo_root / "scripts" / "slurm" / "prune.sbatch")], env=env,
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
