"""Measurement helpers shared by the benchmark scripts under ``bench/``.

The method is the one ``bench/loss_memory.py`` introduced (see its docstring): every measured case runs in a fresh
subprocess; peak extra memory is the kernel's peak-RSS counter (``VmHWM``, reset through
``/proc/self/clear_refs``) minus the RSS once the inputs exist; time is the median of a few repeats after the
first, untimed (memory-measured) run; an address-space limit (``RLIMIT_AS``) makes a case too big for the machine
fail with an allocation error instead of waking the OOM killer on a shared host.

Worker side::

    res = measure_case(step, repeats=3, mem_budget_bytes=...)   # peak_extra_bytes, first_run_s, times_s, median_s

Parent side::

    res = run_worker(__file__, spec)        # runs `python SCRIPT --_worker JSON`, reads spec["result_path"]
    info = machine_info(); cmd = command_line(__file__, argv); write_json(path, report)

Linux only (``/proc``). Nothing here imports torch at module level, so the parent stays light.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

GIB = 1024**3
MIB = 1024**2
REPO_ROOT = Path(__file__).resolve().parent.parent


def ensure_repo_on_path() -> None:
    """Make ``import dflash_ds`` and ``import bench...`` work when a script is run by path."""
    for p in (str(REPO_ROOT), str(REPO_ROOT / "bench")):
        if p not in sys.path:
            sys.path.insert(0, p)


# --------------------------------------------------------------------------------------------------- /proc readers


def proc_status_kib(*keys: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` in KiB (-1 where absent)."""
    text = Path("/proc/self/status").read_text()
    out = {}
    for key in keys:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
        out[key] = int(m.group(1)) if m else -1
    return out


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` (peak RSS) to the current RSS (Linux >= 4.0). False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def meminfo_bytes(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def cpu_model() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - not installed
        return None


def machine_info() -> dict[str, Any]:
    """CPU, memory, GPU (if any) and library versions of this process's machine."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_bytes": meminfo_bytes("MemTotal"),
        "mem_available_bytes_at_start": meminfo_bytes("MemAvailable"),
        "loadavg_at_start": list(os.getloadavg()),
        "torch_version": torch.__version__,
        "transformers_version": _version("transformers"),
        "peft_version": _version("peft"),
        "deepspeed_version": _version("deepspeed"),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_bytes=props.total_memory,
            gpu_multiprocessors=props.multi_processor_count,
            cuda_version=torch.version.cuda,
        )
    return info


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / GIB:.2f} GiB"


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def command_line(script_file: str, argv: list[str] | None) -> str:
    """The command as a user would type it from the current directory."""
    cli_args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", os.path.relpath(os.path.abspath(script_file), os.getcwd())] + cli_args)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (tmp file, then rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def default_mem_budget_gb(cap_gb: float = 16.0, fraction: float = 0.6) -> float:
    """Per-case memory cap: ``fraction`` of MemAvailable, at most ``cap_gb``."""
    avail = meminfo_bytes("MemAvailable") or 8 * GIB
    return round(min(cap_gb, fraction * avail / GIB), 1)


# --------------------------------------------------------------------------------------------------- worker side


def cap_address_space(budget_bytes: int) -> None:
    """``RLIMIT_AS`` = current virtual size + ``budget_bytes``: a bigger case fails with an allocation error."""
    vm_size = proc_status_kib("VmSize")["VmSize"] * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + int(budget_bytes), resource.getrlimit(resource.RLIMIT_AS)[1]))


class PeakRSS:
    """Peak extra resident memory over a region: ``VmHWM`` after a ``clear_refs`` reset minus ``VmRSS`` at start.

    RSS counts pages actually touched, and PyTorch's CPU allocator hands large tensors straight to and from the OS
    (glibc ``mmap``/``munmap``), so this is the true simultaneous peak of live tensors plus library scratch. Falls
    back to ``ru_maxrss`` growth (an upper bound when the region set no new maximum) where ``clear_refs`` is not
    writable.
    """

    def start(self) -> "PeakRSS":
        self.hwm_reset = reset_peak_rss()
        self.rss0 = proc_status_kib("VmRSS")["VmRSS"] * 1024
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def stop(self) -> tuple[int, str]:
        if self.hwm_reset:
            peak = proc_status_kib("VmHWM")["VmHWM"] * 1024 - self.rss0
            return int(peak), "VmHWM after clear_refs reset minus VmRSS baseline"
        maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        method = "ru_maxrss growth" + ("" if maxrss1 > self.maxrss0 else " (upper bound: no new maximum)")
        return int(maxrss1 - self.rss0), method


def timed_repeats(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run ``fn`` ``repeats`` times; per-run wall times, their median and the CPU-seconds per wall-second."""
    times, cpu_times = [], []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.perf_counter()
    for _ in range(repeats):
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        del out
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    # ~torch_threads when the cores were ours, lower when the machine was shared
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "times_s": times,
        "median_s": statistics.median(times) if times else None,
        # CPU seconds (all threads, user + system) per run: with one thread, the work done regardless of how
        # long other processes kept this one off the core; a fairer comparison on a shared machine
        "cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times) if cpu_times else None,
        "timed_cpu_per_wall": cpu / max(time.perf_counter() - wall0, 1e-9),
    }


def measure_case(
    fn: Callable[[], Any],
    repeats: int,
    mem_budget_bytes: int | None,
    after_first: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Peak extra memory of the first call of ``fn`` and the median time of ``repeats`` further calls.

    Call it after the inputs exist and after a small warm-up (kernel/thread-pool initialisation belongs in the
    baseline). ``after_first(value)`` receives the first call's return value (to save it) before it is freed.
    Returns ``status`` "ok" or "alloc_failed" (with ``error``) when the address-space cap was hit.
    """
    result: dict[str, Any] = {"status": "ok"}
    gc.collect()
    if mem_budget_bytes is not None:
        cap_address_space(mem_budget_bytes)
    meter = PeakRSS().start()
    try:
        t0 = time.perf_counter()
        value = fn()
        first_s = time.perf_counter() - t0
    except (RuntimeError, MemoryError) as exc:  # DefaultCPUAllocator: can't allocate memory
        result.update(status="alloc_failed", error=str(exc).splitlines()[0][:300])
        return result
    peak, method = meter.stop()
    result.update(peak_extra_bytes=peak, baseline_rss_bytes=meter.rss0, memory_method=method, first_run_s=first_s)
    if after_first is not None:
        after_first(value)
    del value
    gc.collect()
    try:
        result.update(timed_repeats(fn, repeats))
    except (RuntimeError, MemoryError) as exc:
        result.update(status="alloc_failed", error="in a timed repeat: " + str(exc).splitlines()[0][:300])
        return result
    if result["median_s"] is None:
        result["median_s"] = first_s
    return result


# --------------------------------------------------------------------------------------------------- parent side


def run_worker(script_file: str, spec: dict, label: str = "") -> dict[str, Any]:
    """Run ``python SCRIPT --_worker JSON(spec)`` in a fresh process; return the JSON it wrote to
    ``spec["result_path"]`` plus ``wall_s_including_setup`` and the load average before and after.

    A crashed worker gives ``{"status": "worker_failed", "error": ...}``.
    """
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(script_file), "--_worker", json.dumps(spec)],
                          cwd=str(REPO_ROOT))
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(spec["result_path"]):
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        print(f"{label} worker failed ({how})", flush=True)
        return {"status": "worker_failed", "error": how, "wall_s_including_setup": wall}
    res = json.loads(Path(spec["result_path"]).read_text())
    res["wall_s_including_setup"] = wall
    res["loadavg_1min_before_after"] = [load_before, os.getloadavg()[0]]
    return res


def affine_extrapolate(points: list[tuple[float, float]], x: float) -> tuple[float, str] | None:
    """Value at ``x`` from measured ``(x, y)`` points: the line through the two largest ``x`` (never below the
    largest measured ``y``), or proportional through the origin from a single point. ``None`` without points."""
    pts = sorted(points)
    if not pts:
        return None
    if len(pts) == 1 or pts[-1][0] == pts[-2][0]:
        x1, y1 = pts[-1]
        return y1 * x / x1, f"proportional from x={x1:g}"
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    slope = (y1 - y0) / (x1 - x0)
    return max(y1, y1 + slope * (x - x1)), f"affine through x={x0:g} and x={x1:g}"
