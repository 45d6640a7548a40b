"""The multi-node launch: the composer command rendered from a simulated SLURM job of 2 nodes x 8 GPUs."""

import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
from script_modules import script

from llmshear.slurm import STOP_SIGNALS, SlurmEnvironmentError, expand_hostlist, first_host, launch_command

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


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("rack[1-2]-gpu[01-02]", ["rack1-gpu01", "rack1-gpu02", "rack2-gpu01", "rack2-gpu02"]),
    ("node[001-004,010]", ["node001", "node002", "node003", "node004", "node010"]),
    ("a1,b[3-4],c[09-10]x", ["a1", "b3", "b4", "c09x", "c10x"]),
    ("single", ["single"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("nodelist", ["", "a[1-", "a[3-1]", "a]b", "a[x]", "a,,b"])
def test_malformed_hostlist_is_named(nodelist):
    with pytest.raises(SlurmEnvironmentError, match="SLURM_JOB_NODELIST"):
        expand_hostlist(nodelist)


def test_per_rank_logs_when_a_log_dir_is_set():
    command = launch_command({**JOB, "SLURM_NODEID": "0", "LLMSHEAR_LOG_DIR": "logs/j"}, "composer", "train.py", [])
    assert command[11:15] == ["--stdout", "logs/j/rank{rank}.stdout.txt", "--stderr", "logs/j/rank{rank}.stderr.txt"]


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


def _sbatch_env(repo_root, tmp_path, nodelist="rack[1-2]-gpu[01-02]"):
    srun = tmp_path / "srun"
    srun.write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                    'for n in 0 1; do SLURM_NODEID=$n "$@" --dry-run || exit 1; done\n')
    srun.chmod(0o755)
    return {**os.environ, **JOB, "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NAME": "llmshear-x",
            "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": sys.executable, "SLURM_SUBMIT_DIR": str(repo_root),
            "LLMSHEAR_LOG_DIR": str(tmp_path / "logs")}


def _sbatch(repo_root, kind, env):
    return subprocess.run(["bash", str(repo_root / "scripts" / "slurm" / f"{kind}.sbatch"), "yaml/x.yaml", "seed=3"],
                          env=env, capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.parametrize("kind", ["prune", "continue"])
def test_sbatch_script_launches_one_composer_per_node(repo_root, tmp_path, kind):
    """Run the sbatch file with a stand-in ``srun`` that plays both nodes with ``--dry-run``; without
    ``scontrol`` the master address comes from our parser of the bracketed node list."""
    text = (repo_root / "scripts" / "slurm" / f"{kind}.sbatch").read_text()
    for directive in ("--cpus-per-task=", "--mem=", "--requeue", "--ntasks-per-node=1"):
        assert f"#SBATCH {directive}" in text
    env = _sbatch_env(repo_root, tmp_path)
    lines = _sbatch(repo_root, kind, env)
    master = "rack1-gpu01" if shutil.which("scontrol") is None else None
    assert len(lines) == 2
    for node, line in enumerate(lines):
        assert f"--world_size 16 --node_rank {node} --master_addr {master or ''}" in line
        words = shlex.split(line)
        assert words[words.index("--stdout") + 1] == f"{tmp_path}/logs/rank{{rank}}.stdout.txt"
        assert line.endswith(f"{repo_root}/train.py yaml/x.yaml checkpoint.autoresume=true seed=3")
    assert (tmp_path / "logs").is_dir()


def test_sbatch_master_from_scontrol(repo_root, tmp_path):
    scontrol = tmp_path / "scontrol"
    # thousands of hosts: a reader that stops after the first line would kill the writer (SIGPIPE, pipefail)
    scontrol.write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "head%02d\\n" $(seq 7 20000)\n')
    scontrol.chmod(0o755)
    lines = _sbatch(repo_root, "prune", _sbatch_env(repo_root, tmp_path))
    assert all("--master_addr head07 " in line for line in lines)


def test_sbatch_without_recipe_prints_usage(repo_root, tmp_path):
    usage = subprocess.run(["bash", str(repo_root / "scripts" / "slurm" / "prune.sbatch")],
                           env=_sbatch_env(repo_root, tmp_path), capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def _stub(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize(("srun", "requeued"), [
    ("exit 75\n", True),  # SIGUSR1 ahead of the time limit: the run stopped with a checkpoint
    ("kill -TERM $PPID; exit 75\n", False),  # preemption or scancel: the shell got SIGTERM too
    ("exit 1\n", False),  # a failure is not retried
])
def test_sbatch_requeues_a_run_stopped_ahead_of_the_time_limit(repo_root, tmp_path, srun, requeued):
    env = _sbatch_env(repo_root, tmp_path)
    _stub(tmp_path, "srun", srun)
    _stub(tmp_path, "scontrol", f'if [ "$1" = requeue ]; then echo "$@" >> {tmp_path}/requeued; fi\n')
    text = (repo_root / "scripts" / "slurm" / "prune.sbatch").read_text()
    assert "#SBATCH --signal=USR1@" in text
    result = subprocess.run(["bash", str(repo_root / "scripts" / "slurm" / "prune.sbatch"), "yaml/x.yaml"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == int(srun.split()[-1])
    assert (tmp_path / "requeued").exists() == requeued
    if requeued:
        assert (tmp_path / "requeued").read_text() == f"requeue {JOB['SLURM_JOB_ID']}\n"
        assert "requeueing job 123456" in result.stderr


def test_launch_ignores_the_stop_signals_it_passes_to_the_ranks(monkeypatch):
    """The ``composer`` launcher it becomes must outlive its ranks' checkpoint on SIGTERM / SIGUSR1."""
    seen = {}
    monkeypatch.setattr(os, "execvp", lambda file, args: seen.update(
        {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}, command=args))
    for key, value in {**JOB, "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        script("slurm/launch").main(["yaml/x.yaml"])
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert all(seen[signum] == signal.SIG_IGN for signum in STOP_SIGNALS)
    assert seen["command"][-1] == "yaml/x.yaml"
