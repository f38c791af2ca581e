"""``python tests/guarded_train.py TRAIN_FLAGS...``: ``dflash_ds.train.main`` with test-only patches, one per
environment variable, for what a CPU-only run cannot show by itself. Runs under torchrun like ``-m dflash_ds.train``.

* ``DFLASH_DS_TEST_EMULATE_CUDA=1``: a GPU world on a CPU, under a collective guard. ``init_distributed`` sees a
  CUDA device (``torch.cuda.is_available()`` is True while it runs, ``torch.cuda.set_device`` does nothing); the
  backend string it requests is recorded and gloo initialised in its place. Every process group remembers the
  backend string it was requested with (``new_group`` without one inherits the world's, as torch does), and every
  tensor collective of ``torch.distributed`` (``TENSOR_COLLECTIVES``) checks each tensor it is handed: a device type
  the group's requested string has no backend for (by torch's own table: ``"nccl"`` covers cuda only) is a
  violation, printed as ``collective guard: ...`` and listed in the report; a real NCCL group would fail there.
  (In the emulation every tensor is on the CPU, including those a GPU run keeps on the GPU, so a narrow backend
  is also charged with DeepSpeed's collectives and the TP activations'; what a GPU run keeps on the CPU is on the
  CPU here too, so no violation a GPU run would have can go unseen.)
* ``DFLASH_DS_TEST_GUARD_LOG=DIR``: each rank writes ``DIR/rank<R>.json`` at exit: the backends requested, the
  collectives checked, the functions that called them (so a test can see the guard was not idle), the violations.
* ``DFLASH_DS_TEST_NAN_MICRO=STEP:I``: micro-batch ``I`` (0-based) of optimizer step ``STEP`` gets a NaN loss (the
  trainer's own ``DFLASH_DS_TEST_NAN_AT_STEP`` poisons every micro-batch of a step); ``DFLASH_DS_TEST_LOSS_LOG=FILE``
  appends every micro-batch loss the trainer computed as a JSON line ``{"step", "micro", "loss"}``.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dflash_ds import train

TENSOR_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "all_reduce_coalesced", "send", "recv",
    "isend", "irecv", "_all_gather_base", "_reduce_scatter_base",
)
PACKAGE = ROOT / "dflash_ds"


def covered_devices(backend: str) -> set[str]:
    """The device types torch gives a backend for, reading ``backend`` as init_process_group does."""
    return set(c10d.BackendConfig(dist.Backend(backend)).get_device_backend_map())


def tensors_in(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if torch.is_tensor(v):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += tensors_in(v)
    return out


def caller() -> str:
    """``file:function`` of the nearest dflash_ds frame that called the collective (``collectives.py``, the package's
    helper, passes it on), or ``deepspeed:file:function`` when DeepSpeed called it on its own behalf."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if PACKAGE in path.parents and path.name != "collectives.py":
            return f"{path.relative_to(PACKAGE)}:{frame.f_code.co_qualname}"
        if "deepspeed" in path.parts and "comm" not in path.parts:
            return f"deepspeed:{path.name}:{frame.f_code.co_qualname}"
        frame = frame.f_back
    return "-"


class CollectiveGuard:
    def __init__(self) -> None:
        self.requested: dict[int, str] = {}  # id(process group) -> the backend string it was requested with
        self.groups: list = []  # keeps the groups alive, so their ids stay theirs
        self.checked: Counter = Counter()
        self.callers: Counter = Counter()
        self.violations: list[str] = []  # one line per distinct (collective, device, backend, caller)

    def remember(self, group, backend: str) -> None:
        if group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER:
            self.groups.append(group)
            self.requested[id(group)] = backend

    def backend_of(self, group) -> str:
        group = c10d._get_default_group() if group is None else group
        if id(group) not in self.requested:
            raise RuntimeError("collective guard: a collective on a process group created behind the guard's back")
        return self.requested[id(group)]

    def install(self) -> None:
        real_init = dist.init_process_group

        def init_process_group(backend=None, *args, **kwargs):
            kwargs.pop("device_id", None)  # no device to bind on a CPU
            real_init("gloo", *args, **kwargs)
            self.remember(c10d._get_default_group(), str(backend))

        dist.init_process_group = c10d.init_process_group = init_process_group

        real_new_group = c10d.new_group
        signature = inspect.signature(real_new_group)

        def new_group(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            requested = bound.arguments.pop("backend", None) or self.backend_of(None)
            group = real_new_group(*bound.args, **bound.kwargs)  # inherits the world's real (gloo) backend
            self.remember(group, str(requested))
            return group

        dist.new_group = c10d.new_group = new_group

        for name in TENSOR_COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self.guarded(name, getattr(dist, name)))

    def guarded(self, name: str, real):
        signature = inspect.signature(real)

        def collective(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            backend = self.backend_of(arguments.get("group"))
            covered, where = covered_devices(backend), caller()
            for device in sorted({t.device.type for t in tensors_in(arguments.values())} - covered):
                # recorded, not raised: gloo runs it anyway, so one run lists every collective a GPU run would fail
                line = (f"collective guard: {name} got a {device} tensor on a process group requested as "
                        f"{backend!r}, which has no backend for {device} (called from {where})")
                if line not in self.violations:
                    self.violations.append(line)
                    print(line, file=sys.stderr, flush=True)
            self.checked[name] += 1
            self.callers[where] += 1
            return real(*args, **kwargs)

        return collective

    def write(self, directory: str) -> None:
        rank = os.environ.get("RANK", "0")
        report = {"requested": sorted(set(self.requested.values())), "checked": dict(self.checked),
                  "callers": dict(self.callers), "violations": self.violations}
        Path(directory, f"rank{rank}.json").write_text(json.dumps(report, indent=1))


def emulate_cuda_in_init_distributed() -> None:
    real = train.init_distributed

    def init_distributed(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for name, value in (("is_available", lambda: True), ("set_device", lambda device: None)):
                stack.callback(setattr, torch.cuda, name, getattr(torch.cuda, name))
                setattr(torch.cuda, name, value)
            return real(*args, **kwargs)

    train.init_distributed = init_distributed


class PoisonOneMicroBatch:
    """Stands in for ``dflash_ds.faults.faults``: NaN at one micro-batch, every loss logged, the rest delegated."""

    def __init__(self, inner, spec: str | None, log: str | None) -> None:
        self.inner, self.log = inner, log
        self.step, self.micro = (int(x) for x in spec.split(":")) if spec else (None, None)
        self.seen: Counter = Counter()

    def at(self, point: str, step: int) -> None:
        self.inner.at(point, step)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        micro = self.seen[step]
        self.seen[step] += 1
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps({"step": step, "micro": micro, "loss": float(loss)}) + "\n")
        loss = self.inner.loss(step, loss)
        return loss * float("nan") if (step, micro) == (self.step, self.micro) else loss


def main() -> int:
    if os.environ.get("DFLASH_DS_TEST_EMULATE_CUDA") == "1":
        guard = CollectiveGuard()
        guard.install()
        emulate_cuda_in_init_distributed()
        if os.environ.get("DFLASH_DS_TEST_GUARD_LOG"):
            atexit.register(guard.write, os.environ["DFLASH_DS_TEST_GUARD_LOG"])
    nan_micro, loss_log = os.environ.get("DFLASH_DS_TEST_NAN_MICRO"), os.environ.get("DFLASH_DS_TEST_LOSS_LOG")
    if nan_micro or loss_log:
        train.faults = PoisonOneMicroBatch(train.faults, nan_micro, loss_log)
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
