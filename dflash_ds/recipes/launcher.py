"""The ``deepspeed`` launcher as the demo (and the GPU smoke) runs it: from this interpreter, on a free local port,
CPU ranks of one thread each unless told otherwise.

Public API::

    LauncherNotFound;  deepspeed_launcher() -> argv prefix
    launch_command(ranks, module, args) -> argv;  rank_env() -> environment;  free_port() -> int
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Sequence


class LauncherNotFound(RuntimeError):
    """DeepSpeed's launcher cannot run from this interpreter."""


def deepspeed_launcher() -> list[str]:
    """The ``deepspeed`` launcher as this interpreter runs it: ``python -m deepspeed.launcher.runner`` is what the
    ``deepspeed`` script runs, and it needs nothing on PATH, so a virtual environment used without being activated
    (``venv/bin/dflash-ds demo``) launches its own DeepSpeed, and its ranks the same interpreter. Raises
    :class:`LauncherNotFound`, saying what to do, when this interpreter cannot import DeepSpeed."""
    if importlib.util.find_spec("deepspeed") is None:
        raise LauncherNotFound(
            f"DeepSpeed is not installed for this Python ({sys.executable}), and the demo trains through its "
            "launcher: run the demo with the interpreter dflash-ds was installed into (activate that virtual "
            "environment, or call its bin/dflash-ds), or install it here: pip install -e '.[cpu]' "
            "(after pip install torch==2.13.0)")
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def free_port() -> int:
    """A TCP port free on this machine right now (the rendezvous port of a local launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(ranks: int, module: str, args: Sequence[str]) -> list[str]:
    """``ranks`` local processes of ``python -m module args...`` under the launcher, on a free port."""
    return [*deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port", str(free_port()),
            "--module", module, *args]


def rank_env() -> dict[str, str]:
    """This environment for the ranks: DeepSpeed's CPU accelerator and one thread a rank unless set already (the
    ranks share the cores; oversubscription slows both)."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
