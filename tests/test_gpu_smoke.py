"""``bash bench/gpu/run.sh --smoke``, the GPU acceptance command, run on the CPU (``--device cpu``: tiny shapes, 2
gloo ranks through the deepspeed launcher), so that every check it makes on a GPU also runs in CI and the script
cannot rot between the rare sessions that are lent a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # multi-rank / subprocess runs: left out of the fast subset (-m "not slow")

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "bench" / "gpu" / "run.sh"

CHECKS = ["target", "train zero2", "train zero3", "zero2 == zero3", "training lowers the loss", "resume zero2",
          "resume == uninterrupted", "export", "drafts accepted", "train dflash zero3", "dflash drafter lowers the loss",
          "greedy dflash drafter == generate"]
EVAL_CHECKS = ["eval compile={}", "greedy compile={} AR engine == generate",
               "greedy compile={} two_forward loop == generate", "greedy compile={} fused loop == generate"]
LINE = re.compile(r"^(PASS|FAIL|SKIP) ([^:]+?)(?:: (.*))?$")


def smoke_env() -> dict:
    return {**os.environ, "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def results(stdout: str) -> dict[str, tuple[str, str]]:
    found = {}
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m:
            found[m.group(2)] = (m.group(1), m.group(3) or "")
    return found


def test_cpu_smoke_passes_every_check(tmp_path):
    proc = subprocess.run(["bash", str(RUN_SH), "--smoke", "--device", "cpu", "--workdir", str(tmp_path / "smoke")],
                          cwd=ROOT, env=smoke_env(), capture_output=True, text=True, timeout=900)
    out = proc.stdout
    found = results(out)
    failed = {name: detail for name, (status, detail) in found.items() if status == "FAIL"}
    assert proc.returncode == 0 and not failed, (
        f"exit {proc.returncode}; failed: {failed}\n{out[-6000:]}\n{proc.stderr[-3000:]}")
    expected = CHECKS + [c.format(mode) for mode in ("none", "static", "compile") for c in EVAL_CHECKS]
    for name in expected:
        assert name in found, f"no result line for {name!r}:\n{out[-6000:]}"
        status, detail = found[name]
        if status == "SKIP":  # allowed only where torch.compile cannot build at all (no C++ compiler)
            assert "compile=compile" in name and "torch.compile cannot build" in detail, (name, detail)
        else:
            assert status == "PASS", (name, status, detail)
    assert out.strip().splitlines()[-1].startswith("SMOKE PASS"), out[-2000:]


def test_smoke_on_a_missing_device_fails_with_one_line():
    """--device cuda where torch sees no GPU: one FAIL line naming the cure and exit 1, not a traceback."""
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "smoke.py"), "--device", "cuda"], cwd=ROOT,
                          env=smoke_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert results(proc.stdout) == {"cuda": ("FAIL", "torch sees no CUDA device (use --device cpu for the CPU smoke)")}
    assert "Traceback" not in proc.stdout + proc.stderr


def test_run_sh_smoke_without_a_gpu_says_so():
    """bash bench/gpu/run.sh --smoke (GPU) on a machine without nvidia-smi: exit 3 and what to run instead."""
    env = {**smoke_env(), "PATH": "/usr/bin:/bin"}
    if any((Path(p) / "nvidia-smi").exists() for p in env["PATH"].split(os.pathsep)):
        import pytest

        pytest.skip("nvidia-smi is on PATH")
    proc = subprocess.run(["bash", str(RUN_SH), "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "not a GPU machine" in proc.stderr


def test_smoke_out_of_time_fails_every_check_it_could_not_run(tmp_path):
    """No time left after the target: every later check prints FAIL (none silently missing), the last line names
    them, exit 1."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "smoke.py"), "--device", "cpu",
                           "--time-budget-s", "0", "--workdir", str(tmp_path / "smoke")], cwd=ROOT, env=smoke_env(),
                          capture_output=True, text=True, timeout=300)
    found = results(proc.stdout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert found.pop("target")[0] == "PASS"
    expected = CHECKS[1:] + [c.format(mode) for mode in ("none", "static", "compile") for c in EVAL_CHECKS]
    assert sorted(found) == sorted(expected), proc.stdout
    assert {status for status, _ in found.values()} == {"FAIL"}
    last = proc.stdout.strip().splitlines()[-2]  # then the line saying where the logs are
    assert last.startswith(f"SMOKE FAIL: 1 passed, {len(expected)} failed"), last
    assert (tmp_path / "smoke" / "logs").is_dir()
