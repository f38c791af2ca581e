"""PNG plots of an eval report (dflash_ds.plots): valid PNG files with the report's series. Needs matplotlib
(``pip install -e .[plots]``): the drawing tests skip without it, the missing-extra tests run either way."""

from __future__ import annotations

import importlib.util
import math
import struct
import subprocess
import sys
import zlib

import pytest

from dflash_ds import plots
from dflash_ds.evaluate.benchmarks import BenchPrompt, MissingExtra, benchmark_report

from test_benchmarks import fake_run, tiny_setup

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed: pip install -e .[plots]")


def bar_containers(ax):
    from matplotlib.container import BarContainer

    return [c for c in ax.containers if isinstance(c, BarContainer)]


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature, every chunk's CRC, IHDR first and IEND last."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND" and any(k == b"IDAT" for k, _ in chunks)
    width, height = struct.unpack(">II", chunks[0][1][:8])
    try:
        from PIL import Image
    except ImportError:
        return width, height
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == (width, height)
        im.load()
    return width, height


@pytest.fixture(scope="module")
def report():
    from dflash_ds.evaluate import EvalConfig, run_eval

    model, tok, meta = tiny_setup()
    prompts = [[{"role": "user", "content": c}] for c in ("def x return y", "a is b and c", "print the list of x")]
    return run_eval(model, tok, meta, prompts, EvalConfig(max_new_tokens=16, repeats=2, baselines="all"),
                    progress=False)


@pytest.fixture(scope="module")
def bench_report(report):
    """The report with the benchmark section the eval writes for --benchmark (benchmark_report)."""
    cats, *_, records = fake_run(block=report["config"]["block_size"])
    prompts = [BenchPrompt(str(i), str(i), c, 1, 1, [{"role": "user", "content": "q"}]) for i, c in enumerate(cats)]
    return {**report, "benchmark": benchmark_report("mt-bench", prompts, records)}


def labels_of(report, *keys):
    return [r["label"] for r in report["table"] if not keys or r["method"] in keys]


@needs_matplotlib
def test_write_plots_per_prompt(report, tmp_path):
    paths = plots.write_plots(report, tmp_path / "plots")
    assert [p.name for p in paths] == ["acceptance_by_position.png", "tau_per_prompt.png", "speedup.png"]
    for p in paths:
        w, h = png_size(p)
        assert w >= 600 and h >= 400 and p.stat().st_size > 5000
    assert not list((tmp_path / "plots").glob(".*"))  # no temporary files left


@needs_matplotlib
def test_acceptance_series(report):
    fig = plots.figure_acceptance(report)
    ax = fig.axes[0]
    with_drafter = [k for k, _, e in plots.methods(report) if e.get("acceptance_by_position")]
    assert with_drafter == ["drafter", "drafter_other_loop", "ngram", "untrained_floor"]
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == labels_of(report, *with_drafter)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == labels_of(report, *with_drafter)
    entries = {k: e for k, _, e in plots.methods(report)}
    for key, line in zip(with_drafter, lines):
        want = [math.nan if a is None else a for a in entries[key]["acceptance_by_position"]]
        assert list(line.get_xdata()) == list(range(1, len(want) + 1))
        assert list(line.get_ydata()) == pytest.approx(want, nan_ok=True)


@needs_matplotlib
def test_tau_per_prompt_series(report):
    ax = plots.figure_tau(report).axes[0]
    keys = [k for k, _, e in plots.methods(report) if (e.get("tau_per_prompt") or {}).get("values")]
    data = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]  # reference lines are unlabelled
    assert [ln.get_label() for ln in data] == labels_of(report, *keys)
    entries = {k: e for k, _, e in plots.methods(report)}
    for key, line in zip(keys, data):
        assert list(line.get_ydata()) == pytest.approx(entries[key]["tau_per_prompt"]["values"])
    assert len(ax.patches) == len(keys)  # one CI band per method


@needs_matplotlib
def test_speedup_series(report):
    ax = plots.figure_speedup(report).axes[0]
    rows = [r for r in report["table"] if r["method"] != "autoregressive"]
    bars = bar_containers(ax)
    assert len(bars) == 1 and len(ax.patches) == len(rows) == 6
    assert [t.get_text() for t in ax.get_xticklabels()] == [r["label"] for r in rows]
    assert [b.get_height() for b in ax.patches] == pytest.approx([r["speedup"] for r in rows])
    caps = bars[0].errorbar  # the 95% CI of each bar
    segments = caps.lines[2][0].get_segments()
    for seg, r in zip(segments, rows):
        assert [seg[0][1], seg[1][1]] == pytest.approx(
            [min(r["speedup_ci"][0], r["speedup"]), max(r["speedup_ci"][1], r["speedup"])])


@needs_matplotlib
def test_write_plots_per_category(bench_report, tmp_path):
    paths = plots.write_plots(bench_report, tmp_path)
    assert [p.name for p in paths] == ["acceptance_by_position.png", "tau_per_category.png", "speedup.png",
                                       "speedup_per_category.png"]
    for p in paths:
        png_size(p)
    bench = bench_report["benchmark"]
    groups = [*bench["categories"], "overall"]
    for fig, stat in ((plots.figure_tau(bench_report), "tau"),
                      (plots.figure_speedup_by_category(bench_report), "speedup")):
        ax = fig.axes[0]
        keys = ["drafter", "prompt_lookup_hf"]  # the methods the benchmark section has
        containers = bar_containers(ax)
        assert [c.get_label() for c in containers] == labels_of(bench_report, *keys)
        assert [t.get_text() for t in ax.get_xticklabels()] == groups
        for key, bars in zip(keys, containers):
            want = [bench["by_category"][g][key][stat] for g in bench["categories"]] + [bench["overall"][key][stat]]
            assert [b.get_height() for b in bars] == pytest.approx(want)
    # the acceptance plot shades the drafter's per-position interval
    ax = plots.figure_acceptance(bench_report).axes[0]
    assert len(ax.collections) == 1


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingExtra, match=r"dflash-ds\[plots\]"):
        plots.write_plots({"table": []}, tmp_path)
    with pytest.raises(MissingExtra, match="matplotlib"):
        plots.require_matplotlib()
    assert not list(tmp_path.iterdir())


def test_package_imports_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import dflash_ds.plots, dflash_ds.evaluate.benchmarks\n"
            "try:\n    dflash_ds.plots.require_matplotlib()\nexcept dflash_ds.evaluate.benchmarks.MissingExtra as e:\n"
            "    print('missing:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'dflash-ds[plots]'" in out.stdout
