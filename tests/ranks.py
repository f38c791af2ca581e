"""Run ``python -m MODULE ARGS`` (or ``python SCRIPT ARGS``) as N local gloo ranks, the way torchrun does, but
forked from a warm interpreter: the tests' multi-rank runs spent most of their time importing torch, transformers
and DeepSpeed (about 10 s a launch on 2 cores, against well under a second of training).

A *zygote* process (``python tests/ranks.py``, started once per test session) imports those third-party packages
and nothing of ``dflash_ds``, then forks one child per rank for every job it is sent. Each child gets the job's
environment (with torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``), working directory and argv, and
runs the module as ``__main__`` with a fresh import of the package, so environment read at import time
(``dflash_ds.faults``) is the job's. What the third-party imports read from the environment (OMP_NUM_THREADS,
DS_ACCELERATOR, TORCH*, HF_*: IMPORT_ENV_PREFIXES) is fixed in the zygote, so there is one zygote per distinct set
of those values, started when a job first needs it. A forked rank reseeds python's, torch's and numpy's global
generators from the OS, as a fresh interpreter seeds them, rather than share the zygote's state. As under
torchrun, when one rank fails the others are stopped, and the job's output is every rank's stdout and stderr. What
the launchers themselves do (hostfiles, node ranks, exit-code passing) stays tested through the real ``deepspeed``
launcher in test_cluster.py, the demo and the GPU smoke.

Public API::

    run_ranks(nproc, target, args, env, cwd, timeout) -> subprocess.CompletedProcess;  free_port() -> int
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# what a rank imports before it does anything (dflash_ds itself is imported fresh in every rank)
WARM_IMPORTS = ("torch", "torch.distributed", "transformers", "transformers.models.qwen3.modeling_qwen3",
                "transformers.models.llama.modeling_llama", "deepspeed", "deepspeed.runtime.engine",
                "deepspeed.runtime.zero.muon.muon_optimizer", "safetensors.torch")
# not datasets: pyarrow starts a jemalloc background thread at import, and a process with threads must not fork
GRACE_S = 10.0  # how long the other ranks get to exit after one failed, before SIGKILL
# environment variables that WARM_IMPORTS read when they are imported (OMP_NUM_THREADS fixes torch's thread count,
# DS_ACCELERATOR DeepSpeed's accelerator, TORCH*/HF_* settings become module constants), by name prefix: a forked
# rank keeps the zygote's values whatever its job's environment says, so every distinct set of them gets a zygote
# of its own (see _zygote). Everything else in a job's environment is read by the job itself, in the rank.
IMPORT_ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "DS_", "TORCH", "PYTORCH", "HF_", "HUGGINGFACE", "TRANSFORMERS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- the zygote


def _reseed() -> None:
    """In a forked rank: what a fresh interpreter draws from the OS at start, drawn again, so that ranks and jobs do
    not share the zygote's random state: python's ``random`` (the stdlib reseeds it after a fork too), torch's
    default generators (``torch.seed()``: the CPU one, and the accelerators' when they start) and, if the zygote
    imported it, numpy's global one. Left shared: the str hash seed (fixed at interpreter start; set
    PYTHONHASHSEED where a test depends on it)."""
    import random

    random.seed()  # from os.urandom
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
    if "numpy.random" in sys.modules:  # else a rank that imports it seeds it from the OS itself
        sys.modules["numpy.random"].seed()


def _child(job: dict, rank: int, forked: bool = False) -> None:
    """In the rank's process (a fork of the zygote, ``forked``, or a fresh interpreter): become rank ``rank`` of
    ``job``, never return."""
    code = 1
    try:
        if forked:
            _reseed()
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        if job["nproc"] > 1:  # one rank is a plain ``python -m``, not a world of one
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job["nproc"]),
                              LOCAL_WORLD_SIZE=str(job["nproc"]), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(job["port"]))
        with open(os.devnull) as null:
            os.dup2(null.fileno(), 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            with open(Path(job["logs"]) / f"rank{rank}.{name}", "w") as f:
                os.dup2(f.fileno(), fd)
        sys.stdout = sys.__stdout__  # the zygote pointed sys.stdout away from its reply channel
        sys.stdout.reconfigure(line_buffering=True)  # a rank SIGKILLed on purpose keeps what it printed
        for path in reversed(job["env"].get("PYTHONPATH", "").split(os.pathsep)):
            if path and path not in sys.path:
                sys.path.insert(0, path)
        import runpy

        target = job["target"]
        if target.endswith(".py"):
            sys.argv = [target, *job["args"]]
            sys.path.insert(0, str(Path(target).resolve().parent))
            runpy.run_path(target, run_name="__main__")
        else:
            sys.argv = [target, *job["args"]]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a rank's crash is its output and exit status, as in a real process
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        import atexit

        atexit._run_exitfuncs()  # what interpreter shutdown would run (TensorBoard writers, logging)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _run_job(job: dict, fork: bool) -> dict:
    """The job's ranks, forked (``fork``) or, where forking is unsafe, started as fresh interpreters that run the same
    :func:`_child`; their exit statuses as torchrun would report them."""
    import signal
    import time

    # rank -> its pid (forked) or its Popen (spawned). The Popen objects are kept: one dropped while its rank runs
    # joins subprocess's list of unwaited children, which the next Popen() reaps, and its exit status is lost here.
    # Every rank is waited for by its own pid (never waitpid(-1), which could take another child of this process).
    ranks: dict[int, int | subprocess.Popen] = {}
    for rank in range(job["nproc"]):
        if fork:
            pid = os.fork()
            if pid == 0:
                _child(job, rank, forked=True)
            ranks[rank] = pid
        else:
            ranks[rank] = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(job), str(rank)])

    def poll(rank: int) -> int | None:  # its exit code as torchrun reports it (-N: killed by signal N), or None
        p = ranks[rank]
        if isinstance(p, subprocess.Popen):
            return p.poll()
        pid, status = os.waitpid(p, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if pid else None

    def stop(sig: int) -> None:  # the ranks still running (not yet reaped: their pids are still theirs)
        for rank, p in ranks.items():
            if rank not in codes:
                if isinstance(p, subprocess.Popen):
                    p.send_signal(sig)
                else:
                    os.kill(p, sig)

    codes: dict[int, int] = {}
    first_failure = 0
    deadline = time.monotonic() + job["timeout"]
    stop_at, timed_out = None, False
    while len(codes) < len(ranks):
        exited = False
        for rank in ranks:
            code = None if rank in codes else poll(rank)
            if code is None:
                continue
            codes[rank], exited = code, True
            if code != 0 and stop_at is None:  # torchrun: one rank failed, the job failed
                first_failure, stop_at = code, time.monotonic()
                stop(signal.SIGTERM)
        if exited:
            continue
        now = time.monotonic()
        if now > deadline:
            timed_out = True
        if timed_out or (stop_at is not None and now - stop_at > GRACE_S):
            stop(signal.SIGKILL)
        time.sleep(0.02)
    return {"code": first_failure, "timed_out": timed_out}


def serve(spawn: bool = False) -> None:
    """Read one JSON job a line on stdin, answer one JSON line on stdout when its ranks have exited. The ranks are
    forks of this process unless ``spawn`` or threads other than this one run here after the imports."""
    import importlib

    for name in WARM_IMPORTS if not spawn else ():
        importlib.import_module(name)
    reply = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the reply channel
    tasks = Path("/proc/self/task")
    threads = [(t / "comm").read_text().strip() for t in tasks.iterdir()] if tasks.is_dir() else ["?"]
    fork = len(threads) == 1 and not spawn  # forking a process with other threads running can deadlock the children
    if len(threads) > 1:
        print(f"tests/ranks.py: {len(threads)} threads after the imports ({', '.join(threads)}): ranks start as "
              "fresh interpreters (slower) instead of forks", file=sys.stderr, flush=True)
    reply.write(json.dumps({"ready": True, "fork": fork}) + "\n")
    reply.flush()
    for line in sys.stdin:
        reply.write(json.dumps(_run_job(json.loads(line), fork)) + "\n")
        reply.flush()


# ------------------------------------------------------------------------------------------------ the test side

def import_env(env: dict) -> tuple:
    """The part of ``env`` that the zygote's imports read (IMPORT_ENV_PREFIXES), as a hashable key."""
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_ENV_PREFIXES)))


# one zygote per (spawning, import_env(job's environment)): a job runs only in a zygote whose imports read the same
# values as its own environment holds; each is started on first use, kept for the session, killed at exit
_zygotes: dict[tuple[bool, tuple], subprocess.Popen] = {}


def _zygote(env: dict, spawn: bool) -> subprocess.Popen:
    key = (spawn, import_env(env))
    proc = _zygotes.get(key)
    if proc is not None and proc.poll() is None:
        return proc
    proc = subprocess.Popen([sys.executable, "-u", __file__, *(["--spawn"] if spawn else [])], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True)
    ready = json.loads(proc.stdout.readline() or "{}")
    if not ready.get("ready"):
        raise RuntimeError(f"the rank zygote did not start (exit {proc.poll()})")
    proc.forks = bool(ready.get("fork"))  # how its ranks start (tests/test_ranks.py)
    import atexit

    atexit.register(proc.kill)
    _zygotes[key] = proc
    return proc


def run_ranks(nproc: int, target: str, args, env: dict, cwd, timeout: float = 600,
              spawn: bool = False) -> subprocess.CompletedProcess:
    """``nproc`` ranks of ``target`` (a module name, or a ``.py`` script path) with ``args``, in ``env`` (the
    zygote they fork from imported torch & co. under the same IMPORT_ENV_PREFIXES variables) and ``cwd``; one rank
    is a plain ``python -m`` (no torchrun variables). Returns what ``subprocess.run`` would for torchrun: the exit
    status of the rank that failed first (or 0), every rank's stdout and stderr in rank order. Raises
    ``subprocess.TimeoutExpired`` past ``timeout`` (the ranks are killed first). ``spawn``: start the ranks as fresh
    interpreters (the fallback taken where the zygote cannot fork safely), for its tests."""
    zygote = _zygote({**env}, spawn)
    with tempfile.TemporaryDirectory(prefix="ranks_") as logs:
        job = {"nproc": nproc, "target": str(target), "args": [str(a) for a in args], "env": dict(env),
               "cwd": str(cwd), "timeout": timeout, "port": free_port(), "logs": logs}
        zygote.stdin.write(json.dumps(job) + "\n")
        zygote.stdin.flush()
        answer = zygote.stdout.readline()
        if not answer:
            raise RuntimeError(f"the rank zygote died (exit {zygote.poll()})")
        result = json.loads(answer)
        out = "".join((Path(logs) / f"rank{r}.stdout").read_text() for r in range(nproc))
        err = "".join((Path(logs) / f"rank{r}.stderr").read_text() for r in range(nproc))
    cmd = [f"<{nproc} ranks>", str(target), *map(str, args)]
    if result["timed_out"]:
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err)
    return subprocess.CompletedProcess(cmd, result["code"], out, err)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # one rank started as a fresh interpreter (see serve)
        _child(json.loads(sys.argv[2]), int(sys.argv[3]))
    serve(spawn="--spawn" in sys.argv[1:])
