"""PNG plots of a ``dflash-ds eval`` report (``--plot DIR``, the demo): acceptance by draft position per method, τ
per prompt (or per category, for a benchmark run) per method with intervals, and speedup per method with its 95%
interval. Every drafter of the eval (``--drafter`` repeated) is a method: one series each.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``, no
pyplot): nothing touches the user's interactive backend or pyplot's global figure list. matplotlib is an optional
extra (``pip install 'dflash-ds[plots]'``) imported only when a plot is drawn; :func:`require_matplotlib` checks for it
up front (before a long eval, not after).

The ``figure_*`` functions return the :class:`matplotlib.figure.Figure` (or None when the report has nothing to draw),
so tests and notebooks can inspect the series; :func:`write_plots` saves them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .evaluate.benchmarks import MissingExtra

AR = "autoregressive"
DRAFTER = "drafter"
INSTALL = "pip install 'dflash-ds[plots]' (or: pip install matplotlib)"


def require_matplotlib() -> None:
    """Raise :class:`MissingExtra` naming the extra when matplotlib is not installed."""
    _canvas()


def _canvas():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtra(f"plots need matplotlib, which is not installed: {INSTALL}") from exc
    return Figure, FigureCanvasAgg


def _figure(width: float = 7.0, height: float = 4.0):
    Figure, FigureCanvasAgg = _canvas()
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


# --------------------------------------------------------------------------------------------------------------
# Reading the report
# --------------------------------------------------------------------------------------------------------------


def methods(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(key, label, entry)`` of every method but the AR baseline, in the report table's order: one per drafter row
    (``report["drafters"][key]``; in a report from before several drafters, the first drafter's entry is the top
    level) and per baseline (``report["baselines"][key]``). Every figure draws one series per entry."""
    drafters = report.get("drafters") or {}
    order = [(r["method"], r["label"]) for r in report.get("table", ())]
    if not order:
        first = [(k, e.get("label", k)) for k, e in drafters.items()] or [(DRAFTER, report.get("label", DRAFTER))]
        order = first + [(k, b.get("label", k)) for k, b in report.get("baselines", {}).items() if k not in drafters]
    out = []
    for key, label in order:
        if key == AR:
            continue
        entry = drafters.get(key) or (report if key == DRAFTER else report.get("baselines", {}).get(key))
        if entry is not None:
            out.append((key, label, entry))
    return out


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _err(value, ci) -> tuple[float, float]:
    """Distances below and above ``value`` of interval ``ci`` (0 where there is none; clipped at 0 when the interval
    is of another estimator and misses the value)."""
    if value is None or not ci or ci[0] is None:
        return 0.0, 0.0
    return max(value - ci[0], 0.0), max(ci[1] - value, 0.0)


def _ci(x):
    """An interval from a list or from :func:`dflash_ds.stats.t_interval`'s dict."""
    return x.get("ci95") if isinstance(x, dict) else x


def _benchmark(report: dict[str, Any]) -> dict[str, Any]:
    return report.get("benchmark") or {}


def _title(report: dict[str, Any], what: str) -> str:
    cfg = report.get("config", {})
    bench = _benchmark(report).get("name")
    model = Path(str(cfg.get("base_model") or cfg.get("model_path") or "")).name
    parts = [what] + [p for p in (bench, model) if p]
    if cfg.get("block_size"):
        parts.append(f"B={cfg['block_size']}")
    return " · ".join(parts)


def _grouped_bars(ax, groups: list[str], series: list[tuple[str, list, list]]) -> None:
    """One bar series per entry ``(label, values, errors)`` over ``groups``."""
    width = 0.8 / max(len(series), 1)
    for s, (label, values, errors) in enumerate(series):
        xs = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
        yerr = [[e[0] for e in errors], [e[1] for e in errors]]
        ax.bar(xs, [_num(v) for v in values], width, yerr=yerr, capsize=3, label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4
                  else "center")


# --------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------


def figure_acceptance(report: dict[str, Any]):
    """Acceptance rate at each draft position (the share of steps whose draft reached position j that accepted
    it), one line per method with a drafter; a band where the report has the benchmark's intervals."""
    overall = _benchmark(report).get("overall", {})
    series = [(k, label, e["acceptance_by_position"]) for k, label, e in methods(report)
              if e.get("acceptance_by_position")]
    if not series:
        return None
    fig, ax = _figure()
    for key, label, acc in series:
        xs = list(range(1, len(acc) + 1))
        line, = ax.plot(xs, [_num(a) for a in acc], marker="o", label=label)
        band = overall.get(key, {}).get("acceptance_ci95")
        if band and len(band) == len(acc):
            lo = [_num(b[0]) if b else math.nan for b in band]
            hi = [_num(b[1]) if b else math.nan for b in band]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, max(len(a) for _, _, a in series) + 1))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(_title(report, "acceptance by draft position"))
    return fig


def figure_tau(report: dict[str, Any]):
    """τ per category (grouped bars with the prompt-resampled 95% interval, plus ``overall``) for a benchmark
    report; otherwise τ per prompt, one line per method, with its mean and the mean's bootstrap interval."""
    bench = _benchmark(report)
    ms = methods(report)
    if bench.get("by_category"):
        cats = list(bench.get("categories") or bench["by_category"])
        groups = [*cats, "overall"]
        stats = [bench["by_category"][c] for c in cats] + [bench.get("overall", {})]
        series = []
        for key, label, _ in ms:
            cells = [s.get(key, {}) for s in stats]
            if any(c.get("tau") is not None for c in cells):
                series.append((label, [c.get("tau") for c in cells],
                               [_err(c.get("tau"), c.get("tau_ci95")) for c in cells]))
        if not series:
            return None
        fig, ax = _figure(max(7.0, 0.25 * len(groups) * len(series)), 4.5)
        _grouped_bars(ax, groups, series)
        ax.set_ylabel("τ (tokens per verify forward)")
        ax.set_title(_title(report, "τ per category (95% CI)"))
    else:
        series = [(label, e["tau_per_prompt"]) for _, label, e in ms if (e.get("tau_per_prompt") or {}).get("values")]
        if not series:
            return None
        fig, ax = _figure()
        for label, pp in series:
            values = pp["values"]
            line, = ax.plot(range(len(values)), values, marker="o", linestyle="-", label=label)
            if pp.get("mean") is not None:
                ax.axhline(pp["mean"], color=line.get_color(), linestyle="--", linewidth=1)
            ci = pp.get("ci95_mean")
            if ci:
                ax.axhspan(ci[0], ci[1], color=line.get_color(), alpha=0.15)
        ax.set_xlabel("prompt")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("τ (tokens per verify forward)")
        ax.set_title(_title(report, "τ per prompt (dashed: mean, band: its 95% CI)"))
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return fig


def figure_speedup(report: dict[str, Any]):
    """Speedup over the autoregressive baseline per method, with the 95% interval over timing rounds."""
    series = [(label, e.get("speedup"), _ci(e.get("speedup_ci"))) for _, label, e in methods(report)]
    if not series:
        return None
    fig, ax = _figure(max(6.0, 1.2 * len(series)), 4.0)
    errs = [_err(v, ci) for _, v, ci in series]
    ax.bar(range(len(series)), [_num(v) for _, v, _ in series],
                  yerr=[[e[0] for e in errs], [e[1] for e in errs]], capsize=4,
                  color=[f"C{i}" for i in range(len(series))])
    for i, ((_, v, _), (_, up)) in enumerate(zip(series, errs)):  # above the bar's interval, not on it
        if v is not None:
            ax.annotate(f"{v:.2f}x", (i, v + up), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom")
    ax.set_ylim(bottom=0)
    ax.margins(y=0.12)
    ax.set_xticks(range(len(series)), [s[0] for s in series], rotation=20, ha="right")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)  # the autoregressive baseline
    ax.set_ylabel("speedup over autoregressive")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(_title(report, "speedup (95% CI over timing rounds)"))
    return fig


def figure_speedup_by_category(report: dict[str, Any]):
    """Speedup per category and overall per method (benchmark reports only)."""
    bench = _benchmark(report)
    if not bench.get("by_category"):
        return None
    cats = list(bench.get("categories") or bench["by_category"])
    groups = [*cats, "overall"]
    stats = [bench["by_category"][c] for c in cats] + [bench.get("overall", {})]
    series = []
    for key, label, _ in methods(report):
        cells = [s.get(key, {}) for s in stats]
        if any(c.get("speedup") is not None for c in cells):
            series.append((label, [c.get("speedup") for c in cells],
                           [_err(c.get("speedup"), _ci(c.get("speedup_ci"))) for c in cells]))
    if not series:
        return None
    fig, ax = _figure(max(7.0, 0.25 * len(groups) * len(series)), 4.5)
    _grouped_bars(ax, groups, series)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("speedup over autoregressive")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title(_title(report, "speedup per category (95% CI)"))
    return fig


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """``{file stem: Figure}`` of every plot the report has data for."""
    per = "per_category" if _benchmark(report).get("by_category") else "per_prompt"
    out = {
        "acceptance_by_position": figure_acceptance(report),
        f"tau_{per}": figure_tau(report),
        "speedup": figure_speedup(report),
        "speedup_per_category": figure_speedup_by_category(report),
    }
    return {k: v for k, v in out.items() if v is not None}


def write_plots(report: dict[str, Any], out_dir) -> list[Path]:
    """Write the report's plots as PNGs into ``out_dir`` (created); returns their paths."""
    require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in figures(report).items():
        path = out / f"{stem}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format="png")
        tmp.replace(path)
        paths.append(path)
    return paths
