"""Clusters on loopback: several "nodes" on 127.0.0.1, each started the way a cluster user starts one.

* ``launch/multi_node.sh`` in no-ssh mode (one ``deepspeed --hostfile H --no_ssh --node_rank N`` per node) and
  ``launch/slurm.sbatch`` under a stand-in ``srun``/``scontrol`` train exactly like one process (the same
  reference and tolerance as tests/test_distributed.py), write each checkpoint and the adapter once, and sharded
  self-distillation over two nodes gives the one-process file.
* One node's rank killed (SIGKILL) or hung (SIGSTOP) mid-step: the other node exits with a line naming the cause
  within ``--dist-timeout``, and ``--resume auto`` then reproduces the uninterrupted run on the same and on a
  smaller world size.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ranks import free_port
from test_distributed import (
    ROOT,
    RUN_FLAGS,
    assert_same_run,
    dist_env,
    metrics,
    regenerate_args,
    run_train,
    train_args,
)

pytestmark = pytest.mark.slow  # multi-rank / subprocess runs: left out of the fast subset (-m "not slow")

TIMEOUT_S = 10  # --dist-timeout of the fault tests: steps here take well under a second, set-up is exempt
LAUNCH_SLACK_S = 20  # launcher start-up and tear-down on a loaded 2-core machine


class Nodes:
    """One launcher per node, each in its own session (so a test can end a hung node's whole tree), output to a
    log file per node. A context manager: whatever is still running at exit is killed."""

    def __init__(self, commands: list[list[str]], envs: list[dict], logdir: Path) -> None:
        self.logs = [logdir / f"node{i}.log" for i in range(len(commands))]
        self.procs = []
        for cmd, env, log in zip(commands, envs, self.logs):
            with log.open("w") as f:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def __enter__(self) -> "Nodes":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def wait(self, i: int, timeout: float) -> float:
        """Wait for node ``i`` to exit; returns the wall-clock time it was seen gone."""
        try:
            self.procs[i].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node {i} still running after {timeout} s:\n{self.log(i)[-3000:]}") from None
        return time.time()

    def wait_all(self, timeout: float = 600) -> None:
        for i in range(len(self.procs)):
            self.wait(i, timeout)
        for i, p in enumerate(self.procs):
            assert p.returncode == 0, f"node {i} failed ({p.returncode}):\n{self.log(i)[-6000:]}"

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the session this test started for that node
                p.wait()


def hostfile(tmp_path: Path, nodes: int = 2, slots: int = 1) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("".join(f"node-{chr(97 + i)} slots={slots}\n" for i in range(nodes)))
    return path


def deepspeed_node(host: Path, node_rank: int, port: int, module: str, args: list[str]) -> list[str]:
    """The command a user runs on node ``node_rank`` of a cluster without passwordless ssh."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(host), "--no_ssh", "--node_rank",
            str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port), "--module", module, *args]


def path_env(env: dict) -> dict:
    """The launch scripts call ``deepspeed``/``torchrun`` by name: this interpreter's first."""
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}


def saved_layout(out: Path) -> dict:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(out / "checkpoints" / latest / "dflash_state.pt", weights_only=False)["layout"]


def assert_written_once(out: Path, logs: str) -> None:
    """Two nodes share the output directory: only global rank 0 may write the run's files."""
    assert len(re.findall(r"checkpoint \S+step_00000005 written", logs)) == 1, logs[-3000:]
    assert logs.count("adapter exported to") == 1
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000005"]
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.partial"))


# ----------------------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize(
    "slots,config,extra",
    [
        (1, "zero3.json", []),
        (1, "autotp2_zero1.json", ["--grad-accum", "2"]),  # each TP pair spans the two nodes
        (2, "autotp2_zero3.json", []),  # 2 nodes x 2 ranks: TP inside a node, ZeRO-3 across the nodes
    ],
    ids=["2x1-zero3", "2x1-tp2-across-nodes", "2x2-tp2-in-node-zero3"],
)
def test_multi_node_script_no_ssh_trains_like_one_process(assets, reference, tmp_path, slots, config, extra):
    out, host, port = tmp_path / "run", hostfile(tmp_path, slots=slots), free_port()
    env = path_env(dist_env({"HOSTFILE": str(host), "MODEL": str(assets / "model"), "DATA": str(assets / "data.jsonl"),
                             "OUT": str(out), "CONFIG": str(ROOT / "ds_configs" / config),
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}))
    script = ["bash", str(ROOT / "launch" / "multi_node.sh"), *RUN_FLAGS, *extra]
    with Nodes([script, script], [{**env, "NODE_RANK": "0"}, {**env, "NODE_RANK": "1"}], tmp_path) as nodes:
        nodes.wait_all()
        logs = nodes.log(0) + nodes.log(1)
    assert saved_layout(out)["world_size"] == 2 * slots  # the nodes formed one world, not one run each
    assert_same_run(reference, out)
    assert_written_once(out, logs)


def test_regenerate_on_two_nodes_matches_one_process(assets, regenerated, tmp_path):
    host, port, out = hostfile(tmp_path), free_port(), tmp_path / "two_nodes.jsonl"
    commands = [deepspeed_node(host, n, port, "dflash_ds.regenerate", regenerate_args(assets, out)) for n in (0, 1)]
    with Nodes(commands, [dist_env()] * 2, tmp_path) as nodes:
        nodes.wait_all()
    assert out.read_text() == regenerated.read_text()
    assert sorted(p.name for p in tmp_path.glob("two_nodes*")) == ["two_nodes.jsonl"]  # shards merged, no temp file


FAKE_SRUN = r"""#!/usr/bin/env bash
# stand-in srun: one task per node on this machine, with the SLURM_* variables a task sees; --kill-on-bad-exit=1
# ends the other tasks when one fails
kill_on_bad_exit=0
while [[ "$1" == --* ]]; do [[ "$1" == --kill-on-bad-exit=1 ]] && kill_on_bad_exit=1; shift; done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do
  SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 SLURMD_NODENAME=node-$n "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
  if ! wait -n; then rc=1; [[ $kill_on_bad_exit == 1 ]] && kill -9 "${pids[@]}" 2>/dev/null; fi
done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# stand-in scontrol: 'scontrol show hostnames LIST' prints one address per node (all this machine)
for ((n = 0; n < SLURM_NNODES; n++)); do echo 127.0.0.1; done
"""


def test_slurm_script_trains_like_one_process(assets, reference, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    out = tmp_path / "run"
    env = path_env(dist_env({"SLURM_JOB_NODELIST": "node-[0-1]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
                             "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()), "MODEL": str(assets / "model"),
                             "DATA": str(assets / "data.jsonl"), "OUT": str(out),
                             "CONFIG": str(ROOT / "ds_configs" / "zero2.json")}))
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), *RUN_FLAGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert saved_layout(out)["world_size"] == 2
    assert_same_run(reference, out)


# ----------------------------------------------------------------------------------------------------------------
# a rank that dies or hangs


def fault_time(log: str) -> float:
    found = re.search(r"test fault: SIG\w+ to rank 1 at in_step 4, t=([\d.]+)", log)
    assert found, log[-3000:]
    return float(found.group(1))


def start_faulty_run(assets, tmp_path, out, config, extra, signal_name) -> Nodes:
    """Two nodes of one rank each; rank 1 gets ``signal_name`` at the start of step 4 (a checkpoint exists at 2)."""
    host, port = hostfile(tmp_path), free_port()
    args = train_args(assets, out, config, [*extra, "--save-interval", "2", "--dist-timeout", str(TIMEOUT_S)])
    env = dist_env({"DFLASH_DS_TEST_KILL_IN_STEP": "4", "DFLASH_DS_TEST_KILL_RANK": "1",
                    "DFLASH_DS_TEST_KILL_SIGNAL": signal_name})
    return Nodes([deepspeed_node(host, n, port, "dflash_ds.train", args) for n in (0, 1)], [env] * 2, tmp_path)


def test_killed_rank_ends_the_other_node_then_resume_matches(assets, reference, tmp_path):
    out = tmp_path / "run"
    with start_faulty_run(assets, tmp_path, out, "zero3.json", [], "KILL") as nodes:
        ended = nodes.wait(0, timeout=120)
        log = nodes.log(0)
        assert nodes.procs[0].returncode == 3, log[-3000:]  # the launcher passes on the rank's exit code
        assert ended - fault_time(nodes.log(1)) < TIMEOUT_S + LAUNCH_SLACK_S
    assert "dflash-ds train: error: rank 0: another rank died" in log, log[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    run_train(assets, out, nproc=2, config="zero3.json", extra=["--save-interval", "2", "--resume", "auto"])
    assert_same_run(reference, out)


def test_hung_rank_ends_the_other_node_within_the_timeout_then_resume_on_fewer_ranks(assets, reference, tmp_path):
    """TP x2 across the nodes: the stalled collective is on a tensor-parallel group, which torch's new_group() would
    have given its 30-minute default whatever the world group's timeout (dflash_ds/parallel.py)."""
    out = tmp_path / "run"
    with start_faulty_run(assets, tmp_path, out, "autotp2_zero1.json", ["--grad-accum", "2"], "STOP") as nodes:
        ended = nodes.wait(0, timeout=120)
        log = nodes.log(0)
        assert nodes.procs[1].poll() is None, "the stopped rank's node must still be there: a hang, not a death"
        assert nodes.procs[0].returncode == 3, log[-3000:]
        assert ended - fault_time(nodes.log(1)) < TIMEOUT_S + LAUNCH_SLACK_S
    assert f"dflash-ds train: error: rank 0: a collective waited {TIMEOUT_S} s (--dist-timeout)" in log, log[-3000:]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    run_train(assets, out, nproc=1, extra=["--grad-accum", "2", "--save-interval", "2", "--resume", "auto"])
    assert_same_run(reference, out)


def test_only_process_group_failures_become_exit_3():
    from dflash_ds.parallel import dist_failure_message

    gloo = "[third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"
    assert "another rank died" in dist_failure_message(RuntimeError(gloo))
    assert dist_failure_message(RuntimeError("file lock timed out")) is None  # not a collective: the traceback stays
    assert dist_failure_message(ValueError(gloo)) is None
