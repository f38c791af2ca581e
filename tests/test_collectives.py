"""Collectives on a device their process group has a backend for (dflash_ds/collectives.py), proven on a CPU.

A GPU run's world group used to be NCCL alone, and the trainer all-reduces CPU tensors: the first micro-batch of
every multi-GPU run crashed. A CPU-only CI cannot run NCCL, so the 2-rank runs here emulate the GPU world
(tests/guarded_train.py): init_distributed believes it has a CUDA device, the backend it requests is recorded and
gloo stands in for it, and every collective is checked against the backends its group was requested with.
"""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import pytest
import torch

from dflash_ds.collectives import backend_device_types, collective_device, process_group_backend
from guarded_train import TENSOR_COLLECTIVES, covered_devices
from ranks import run_ranks
from test_distributed import ROOT, dist_env, metrics, train_args

PACKAGE = ROOT / "dflash_ds"


def test_process_group_backend_covers_every_device_a_run_uses():
    """A GPU run keeps metric sums, flags and checkpoint gathers on the CPU: its group needs gloo for them."""
    assert covered_devices(process_group_backend("cuda")) == {"cpu", "cuda"}
    assert process_group_backend("cuda").split(",") == ["cpu:gloo", "cuda:nccl"]  # NCCL for the model's tensors
    assert "cpu" in covered_devices(process_group_backend("cpu"))
    with pytest.raises(ValueError, match="device type 'xpu'"):
        process_group_backend("xpu")


@pytest.mark.parametrize("backend", ["nccl", "gloo", "cpu:gloo,cuda:nccl", "cuda:nccl", "cpu:gloo"])
def test_backend_device_types_reads_a_backend_string_as_torch_does(backend):
    assert backend_device_types(backend) == covered_devices(backend)


def test_collective_device_moves_only_what_the_group_cannot_take():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    assert collective_device(cpu, frozenset({"cpu", "cuda"}), gpu) == cpu  # stays: no copy
    assert collective_device(gpu, frozenset({"cpu", "cuda"}), gpu) == gpu
    assert collective_device(cpu, frozenset({"cuda"}), gpu) == gpu  # NCCL alone: a CPU flag goes to the GPU
    assert collective_device(gpu, frozenset({"cpu"}), gpu) == cpu
    with pytest.raises(RuntimeError, match=r"backends for \['xpu'\] only"):
        collective_device(cpu, frozenset({"xpu"}), cpu)


# ----------------------------------------------------------------------------------------------------------------
# the source: every tensor collective of the package goes through dflash_ds/collectives.py

#: calls outside the helper (by qualified function name, so a file may move), each with why its tensor is on a
#: device every group has a backend for. A new direct call fails the test below: route it through
#: dflash_ds.collectives instead (and drop an entry here once its function does).
ALLOWED_DIRECT = {
    "Lockstep.agree": "a buffer made on the model's device",
}


def direct_collective_calls(source: str) -> list[tuple[str, str, int]]:
    """``(qualified function, collective, line)`` for each torch.distributed tensor collective called in ``source``,
    however torch.distributed was imported (``import torch.distributed as dist``, ``import torch``,
    ``from torch.distributed import all_reduce``, ``from torch import distributed``)."""
    tree = ast.parse(source)
    module_aliases, torch_aliases, function_aliases = set(), set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    module_aliases.add(a.asname)
                elif a.name.split(".")[0] == "torch":
                    torch_aliases.add(a.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch.distributed", "torch"):
            for a in node.names:
                if node.module == "torch" and a.name == "distributed":
                    module_aliases.add(a.asname or a.name)
                elif node.module == "torch.distributed" and a.name in TENSOR_COLLECTIVES:
                    function_aliases[a.asname or a.name] = a.name

    def collective_of(func: ast.expr) -> str | None:
        if isinstance(func, ast.Name):
            return function_aliases.get(func.id)
        if not isinstance(func, ast.Attribute) or func.attr not in TENSOR_COLLECTIVES:
            return None
        owner = func.value
        if isinstance(owner, ast.Name) and owner.id in module_aliases:
            return func.attr
        if (isinstance(owner, ast.Attribute) and owner.attr == "distributed" and isinstance(owner.value, ast.Name)
                and owner.value.id in torch_aliases):
            return func.attr
        return None

    found = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = [*scope, child.name]
            if isinstance(child, ast.Call) and (name := collective_of(child.func)):
                found.append((".".join(scope) or "<module>", name, child.lineno))
            visit(child, inner)

    visit(tree, [])
    return found


def test_the_scanner_sees_every_way_of_calling_a_collective():
    source = """
import torch
import torch.distributed as dist
from torch import distributed as d2
from torch.distributed import all_gather as ag

def f(x):
    dist.all_reduce(x)
    torch.distributed.broadcast(x, 0)
    d2.reduce_scatter_tensor(x, x)
    ag([x], x)
    dist.barrier()
    dist.all_gather_object([None], 1)

class C:
    def g(self, x):
        dist.all_reduce(x)
"""
    assert [(f, c) for f, c, _ in direct_collective_calls(source)] == [
        ("f", "all_reduce"), ("f", "broadcast"), ("f", "reduce_scatter_tensor"), ("f", "all_gather"),
        ("C.g", "all_reduce")]


def test_package_calls_tensor_collectives_only_through_the_helper():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "collectives.py":
            continue
        for function, name, line in direct_collective_calls(path.read_text()):
            if function not in ALLOWED_DIRECT:
                offenders.append(f"dflash_ds/{rel}:{line} {function}: torch.distributed.{name}")
    assert not offenders, ("call these through dflash_ds.collectives (it puts the tensor on a device the group has "
                           "a backend for):\n" + "\n".join(offenders))


# ----------------------------------------------------------------------------------------------------------------
# a GPU world emulated on a CPU: 2 gloo ranks, the backend the trainer requests checked at every collective


def guarded_run(assets, out: Path, config: str, extra: list[str]) -> subprocess.CompletedProcess:
    log = out / "guard"
    log.mkdir(parents=True)
    # DeepSpeed is imported before the guard is installed here (tests/ranks.py's warm interpreter), whereas the
    # trainer alone imports it later: no matter, DeepSpeed looks torch.distributed's collectives up when it calls them
    env = dist_env({"DFLASH_DS_TEST_EMULATE_CUDA": "1", "DFLASH_DS_TEST_GUARD_LOG": str(log)})
    args = train_args(assets, out, config, [*extra, "--max-steps", "2"])
    return run_ranks(2, ROOT / "tests" / "guarded_train.py", args, env, ROOT)


@pytest.mark.parametrize(
    "config,extra,callers",
    [
        # two data-parallel ranks: the non-finite flag and the step metrics' sums (CPU) are all-reduced
        ("zero2.json", [], {"_all_finite", "StepMetrics.reduce"}),
        # tensor parallel x2: the activations' all-reduces and the checkpoint's gather of TP-split optimizer states
        ("autotp2_zero1.json", [], {"_all_finite", "_ReduceFromTP.forward", "tp_gather_factor"}),
        # the standalone drafter under TP x2: the sharded target's all-reduces, the replicated drafter's gradient mean
        ("autotp2_zero1.json", ["--drafter", "dflash", "--target-layer-ids", "0"],
         {"_all_finite", "_ReduceFromTP.forward", "average_gradients_over_tp.<locals>.mean"}),
    ],
    ids=["zero2", "autotp2", "autotp2_dflash"],
)
@pytest.mark.slow
def test_emulated_gpu_world_runs_every_collective_on_a_backend_of_its_device(assets, tmp_path, config, extra, callers):
    proc = guarded_run(assets, tmp_path, config, extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    for rank in (0, 1):
        report = json.loads((tmp_path / "guard" / f"rank{rank}.json").read_text())
        assert not report["violations"], "\n".join(report["violations"])
        # the emulation reached init_distributed: it asked for NCCL for the (would-be) GPU tensors
        assert report["requested"] and all("cuda" in covered_devices(b) for b in report["requested"]), report
        seen = {c.rsplit(":", 1)[-1] for c in report["callers"]}  # "file:qualified function"
        assert callers <= seen, report  # the guard saw the package's own collectives
