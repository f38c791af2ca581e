"""tests/ranks.py, the warm launcher of the multi-rank tests, behaves as torchrun does where the tests rely on it:
a gloo world of the given size, the job's environment read fresh, a failed rank failing the job and stopping the
others, a hang ending at the timeout, every rank's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ranks
from ranks import run_ranks

pytestmark = pytest.mark.slow  # starts the zygote (about 10 s of imports)

WORKER = '''
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print(f"rank {rank}/{dist.get_world_size()} sum {t.item():.0f} env {os.environ.get('JOB_VALUE')} argv {sys.argv[1:]}")
mode = os.environ.get("JOB_MODE", "")
if mode == "fail" and rank == 1:
    print("rank 1 failing", file=sys.stderr)
    sys.exit(3)
if mode in ("fail", "hang"):
    # the ranks still running sleep rather than wait at a barrier: gloo would end rank 0 too once rank 1 has gone,
    # and the two exits could be reaped in either order; only the launcher stops it (fail), or the timeout (hang)
    import time
    time.sleep(600)
dist.destroy_process_group()
'''


def env(**extra) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture
def worker(tmp_path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


@pytest.mark.parametrize("spawn", [False, True], ids=["forked", "spawned"])
def test_two_ranks_form_a_world_with_the_jobs_environment_and_argv(worker, tmp_path, spawn):
    for value in ("a", "b"):  # a second job sees its own environment, not the first one's
        proc = run_ranks(2, worker, ["x", 1], env(JOB_VALUE=value), tmp_path, timeout=120, spawn=spawn)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [f"rank {r}/2 sum 3 env {value} argv ['x', '1']" for r in (0, 1)]


@pytest.mark.parametrize("spawn", [False, True], ids=["forked", "spawned"])
def test_a_failed_rank_fails_the_job_and_stops_the_other(worker, tmp_path, spawn):
    start = time.monotonic()
    proc = run_ranks(2, worker, [], env(JOB_MODE="fail"), tmp_path, timeout=120, spawn=spawn)
    assert proc.returncode == 3 and "rank 1 failing" in proc.stderr
    assert time.monotonic() - start < 60  # rank 0, waiting at the barrier, was stopped (not the 120 s timeout)


def test_a_hung_job_ends_at_the_timeout(worker, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired) as info:
        run_ranks(2, worker, [], env(JOB_MODE="hang"), tmp_path, timeout=5)
    assert "sum 3" in info.value.output  # what the ranks printed before the hang comes back


def test_one_rank_is_a_plain_process(tmp_path):
    script = tmp_path / "one.py"
    script.write_text("import os, sys\nprint(os.environ.get('RANK'), os.getcwd())\nsys.exit(2)\n")
    proc = run_ranks(1, script, [], env(), tmp_path, timeout=60)
    assert proc.returncode == 2 and proc.stdout.strip() == f"None {tmp_path}"


def test_the_zygote_forks_only_while_it_is_the_only_thread(tmp_path):
    """The tests' own zygote forks (the fast path); one with another thread running after its imports (here started
    by a sitecustomize) falls back to fresh interpreters and says why, since forking a threaded process can deadlock."""
    assert ranks._zygote(env(), spawn=False).forks is True
    (tmp_path / "sitecustomize.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n")
    threaded = env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-u", ranks.__file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=threaded, text=True)
    try:
        out, err = proc.communicate("", timeout=120)  # no jobs: serve() answers ready, then returns
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.splitlines()[0]) == {"ready": True, "fork": False}
    assert "ranks start as fresh interpreters" in err


# starts each rank only once the ranks before it have exited (zombies, not yet reaped), then runs one spawned job
# in this fresh process (the zygote's loop, _run_job, reaps its children itself)
ORDERED_SPAWN = '''
import json, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import ranks

started = []
class OneAfterAnother(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        deadline = time.monotonic() + 60
        while any(Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
                  for pid in started) and time.monotonic() < deadline:
            time.sleep(0.01)
        super().__init__(*args, **kwargs)
        started.append(self.pid)
subprocess.Popen = OneAfterAnother
print(json.dumps(ranks._run_job(json.loads(sys.argv[2]), fork=False)))
'''


def test_a_spawned_rank_that_exits_before_the_next_one_starts_is_reaped_by_the_job(tmp_path):
    """The fallback keeps each rank's Popen: one dropped while its rank runs joins subprocess's list of unwaited
    children, which the next Popen() reaps, so the job would never see that rank's exit status (and would end on
    ChildProcessError, waiting for it). Here rank 0 has exited, status 5, before rank 1 is started."""
    script = tmp_path / "exits.py"
    script.write_text("import os, sys\nsys.exit(5 if os.environ['RANK'] == '0' else 0)\n")
    job = {"nproc": 2, "target": str(script), "args": [], "env": env(), "cwd": str(tmp_path), "timeout": 60,
           "port": ranks.free_port(), "logs": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", ORDERED_SPAWN, str(Path(ranks.__file__).parent), json.dumps(job)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"code": 5, "timed_out": False}


def test_a_job_whose_import_time_environment_differs_gets_a_zygote_imported_under_it(tmp_path):
    """OMP_NUM_THREADS (torch's thread count), HF_*/TORCH*/DS_ACCELERATOR are read when the zygote imports torch,
    transformers and DeepSpeed, before any job: a job with other values than the zygote's must not run in it. One
    with the same values reuses it."""
    script = tmp_path / "imported.py"
    script.write_text("import torch, huggingface_hub.constants as c\n"
                      "print(torch.get_num_threads(), c.HF_HUB_OFFLINE)\n")
    first = run_ranks(1, script, [], env(), tmp_path, timeout=120)  # in the zygote the other tests use
    threads, offline = first.stdout.split()
    assert first.returncode == 0 and threads == "1", first.stdout + first.stderr[-3000:]
    other = env(OMP_NUM_THREADS="2", HF_HUB_OFFLINE="0" if offline == "True" else "1")
    try:
        second = run_ranks(1, script, [], other, tmp_path, timeout=120)
        assert second.returncode == 0, second.stderr[-3000:]
        assert second.stdout.split() == ["2", str(offline != "True")]
        assert run_ranks(1, script, [], env(), tmp_path, timeout=120).stdout == first.stdout
        assert ranks._zygote(other, spawn=False) is not ranks._zygote(env(), spawn=False)
        assert ranks._zygote(env(JOB_VALUE="x"), spawn=False) is ranks._zygote(env(), spawn=False)  # the job's own
    finally:
        extra = ranks._zygotes.pop((False, ranks.import_env(other)), None)
        if extra is not None:  # the only job that needs it has run
            extra.kill()
            extra.wait()


@pytest.mark.parametrize("spawn", [False, True], ids=["forked", "spawned"])
def test_every_rank_of_every_job_draws_its_own_random_numbers(tmp_path, spawn):
    """As in fresh interpreters (torchrun), a forked rank must not inherit the zygote's random state: python's
    random, torch's default generator (seeded from the OS in a fresh process) and numpy's global one differ per rank
    and per job, so two ranks' unseeded draws (dropout masks, shuffles) are not the same numbers."""
    script = tmp_path / "draws.py"
    script.write_text("import random, numpy, torch\n"
                      "print(random.random(), torch.rand(1).item(), torch.initial_seed(), numpy.random.rand())\n")
    draws = []
    for _ in range(2):
        proc = run_ranks(2, script, [], env(), tmp_path, timeout=120, spawn=spawn)
        assert proc.returncode == 0, proc.stderr[-3000:]
        draws += [line.split() for line in proc.stdout.splitlines()]
    assert len(draws) == 4
    for name, values in zip(("random", "torch.rand", "torch.initial_seed", "numpy.random"), zip(*draws)):
        assert len(set(values)) == 4, (name, values)
