"""The report, from the methods' runs: τ, its histogram, acceptance by block position, forwards, speedups with
their intervals, per-prompt outputs, the benchmark's per-category section, and the printed tables.

Everything here is a pure function of the recorded runs (:class:`Runs`): no model, no clock."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Sequence

from ..kinds import DRAFTER
from ..speculative import SpecResult
from ..stats import bootstrap_ci, repetition_rate, t_interval
from .benchmarks import BenchPrompt, benchmark_report, format_benchmark_table, prompt_record
from .config import AR, PROMPT_LOOKUP, SPLIT_AT, TABLE_ORDER, EvalConfig

LOOP_STATS = ("loop", "forwards_per_step", "tokens_per_forward", "rows_per_forward", "fallback_rate")


class Runs:
    """One method's generations (first round, up to ``max_new_tokens`` per prompt) and its timing over all rounds:
    ``tokens``/``times`` summed per round, and per prompt ``prompt_seconds[i][round]`` / ``prompt_tokens[i][round]``
    (what the per-category speedups are computed from). Every round adds the prompts in the same order."""

    def __init__(self, label: str, max_new_tokens: int) -> None:
        self.label, self.max_new_tokens = label, max_new_tokens
        self.results: list[Any] = []  # SpecResult, or dicts for transformers' generate
        self.outputs: list[list[int]] = []
        self.tokens = [0]  # per round
        self.times = [0.0]
        self.prompt_seconds: list[list[float]] = []
        self.prompt_tokens: list[list[int]] = []
        self._next = 0  # the prompt the next add() records, in the current round

    def new_repeat(self) -> None:
        self.tokens.append(0)
        self.times.append(0.0)
        self._next = 0

    def add(self, repeat: int, g) -> None:
        """Record a :class:`~dflash_ds.speculative.decoders.Generation` of the next prompt in round ``repeat``."""
        self.tokens[-1] += len(g.ids)
        self.times[-1] += g.seconds
        if repeat == 0:
            self.outputs.append(g.ids)
            self.results.append(g.result)
            self.prompt_seconds.append([g.seconds])
            self.prompt_tokens.append([len(g.ids)])
        else:
            self.prompt_seconds[self._next].append(g.seconds)
            self.prompt_tokens[self._next].append(len(g.ids))
        self._next += 1

    @property
    def tokens_per_s(self) -> float:
        t = sum(self.times)
        return sum(self.tokens) / t if t > 0 else 0.0

    def rates(self) -> list[float]:
        return [n / t if t > 0 else 0.0 for n, t in zip(self.tokens, self.times)]

    @classmethod
    def interleave(cls, shards: list["Runs"]) -> "Runs":
        """One method's runs from the ranks of a sharded eval, rank ``r`` having decoded prompts ``r, r + W, ...``:
        generations and per-prompt timings back in prompt order; tokens and seconds added up per round, so tokens/s
        stays the rate of one decoding stream."""
        first = shards[0]
        merged = cls(first.label, first.max_new_tokens)
        merged.tokens = [sum(s.tokens[k] for s in shards) for k in range(len(first.tokens))]
        merged.times = [sum(s.times[k] for s in shards) for k in range(len(first.times))]
        for i in range(sum(len(s.outputs) for s in shards)):
            shard, j = shards[i % len(shards)], i // len(shards)
            merged.outputs.append(shard.outputs[j])
            merged.results.append(shard.results[j])
            merged.prompt_seconds.append(shard.prompt_seconds[j])
            merged.prompt_tokens.append(shard.prompt_tokens[j])
        return merged


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------


def _tau_split(results: Sequence[SpecResult], split: int = SPLIT_AT) -> tuple[float | None, float | None]:
    sums = [[0, 0], [0, 0]]  # [tokens, steps] for steps starting before / at-or-after `split`
    for r in results:
        for start, committed in zip(r.step_starts, r.committed_per_step):
            bucket = sums[0] if start < split else sums[1]
            bucket[0] += committed
            bucket[1] += 1
    return tuple(b[0] / b[1] if b[1] else None for b in sums)  # type: ignore[return-value]


def spec_stats(results: Sequence[SpecResult], block_size: int) -> dict[str, Any]:
    """τ, its histogram, acceptance by block position and forward counts over a set of generations."""
    tokens = sum(r.num_tokens for r in results)
    verify = sum(r.verify_forwards for r in results)
    draft = sum(r.draft_forwards for r in results)
    hist = {str(k): 0 for k in range(1, block_size + 1)}
    reach = [0] * max(block_size - 1, 0)
    accepted = [0] * max(block_size - 1, 0)
    for r in results:
        for c, n, k in zip(r.committed_per_step, r.accepted_per_step, r.proposed_per_step):
            hist[str(c)] = hist.get(str(c), 0) + 1
            for j in range(k):
                reach[j] += 1
                accepted[j] += j < n
    first, rest = _tau_split(results)
    per_prompt = [r.tau for r in results]
    steps = sum(len(r.committed_per_step) for r in results)
    forwards = draft + verify
    return {
        "loop": results[0].loop if results else None,
        "forwards_per_step": forwards / steps if steps else None,
        "tokens_per_forward": tokens / forwards if forwards else None,
        "rows_per_forward": sum(r.rows for r in results) / forwards if forwards else None,
        "fallback_rate": sum(r.fallbacks for r in results) / steps if steps else None,
        "tau": tokens / verify if verify else 0.0,
        "tau_histogram": hist,
        "acceptance_by_position": [a / c if c else None for a, c in zip(accepted, reach)],
        "forwards_per_token": (draft + verify) / tokens if tokens else None,
        "verify_forwards_per_token": verify / tokens if tokens else None,
        "draft_forwards_per_token": draft / tokens if tokens else None,
        "draft_forwards": draft,
        "verify_forwards": verify,
        "generated_tokens": tokens,
        "tau_first_32": first,
        "tau_rest": rest,
        "tau_per_prompt": {
            "values": per_prompt,
            "mean": statistics.fmean(per_prompt) if per_prompt else None,
            "median": statistics.median(per_prompt) if per_prompt else None,
            "ci95_mean": bootstrap_ci(per_prompt, "mean"),
            "ci95_median": bootstrap_ci(per_prompt, "median"),
        },
    }


def _speedups(run: Runs, ar: Runs) -> dict[str, Any]:
    return t_interval([r / a if a > 0 else 0.0 for r, a in zip(run.rates(), ar.rates())])


def _method_entry(name: str, run: Runs, ar: Runs, cfg: EvalConfig) -> dict[str, Any]:
    """A method's report entry against the AR baseline ``ar``; ``cfg`` resolved for it (its block size)."""
    greedy = cfg.temperature == 0
    ar_tps = ar.tokens_per_s
    entry: dict[str, Any] = {"label": run.label, "tokens_per_s": run.tokens_per_s,
                             "speedup": run.tokens_per_s / ar_tps if ar_tps > 0 else 0.0,
                             "speedup_ci": _speedups(run, ar)}
    if isinstance(run.results[0], SpecResult):
        s = spec_stats(run.results, cfg.block_size)
        entry.update({k: s[k] for k in ("tau", "tau_histogram", "acceptance_by_position", "forwards_per_token",
                                        "tau_first_32", "tau_rest", "tau_per_prompt", *LOOP_STATS)})
    else:
        forwards = sum(r["forwards"] for r in run.results)
        tokens = sum(r["tokens"] for r in run.results)
        # transformers' first forward (the prefill) already yields a token, so every forward counts
        entry["tau"] = tokens / forwards if forwards else 0.0
        entry["forwards_per_token"] = forwards / tokens if tokens else None
    if name == PROMPT_LOOKUP:
        entry["prompt_lookup_num_tokens"] = cfg.prompt_lookup_tokens
    if run.max_new_tokens < cfg.max_new_tokens:
        entry["max_new_tokens"] = run.max_new_tokens
    matches = [a == b[: run.max_new_tokens] for a, b in zip(run.outputs, ar.outputs)]  # a prefix of AR's, if shorter
    entry["greedy_match"] = all(matches) if greedy else None
    entry["mismatched_prompts"] = [i for i, ok in enumerate(matches) if not ok] if greedy else None
    return entry


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


def drafter_keys(drafters: Sequence, runs: dict[str, Runs]) -> list[str]:
    """Every drafter's method keys present in ``runs``, in table order (each drafter, then its other loop)."""
    return [k for d in drafters for k in (d.key, d.other_key) if k in runs]


def build_report(runs: dict[str, Runs], prompt_ids: list[list[int]], cfg: EvalConfig, drafters: Sequence,
                 eos: list[int], benchmark: tuple[str, Sequence[BenchPrompt], dict | None] | None = None,
                 configs: Sequence[EvalConfig] | None = None) -> dict[str, Any]:
    """The report of an eval of ``drafters`` (:class:`~dflash_ds.kinds.EvalDrafter`, ``configs[i]``
    resolved for ``drafters[i]``; ``cfg`` the first's).

    The first drafter is the headline: its τ, acceptance and speedup at the top level (with its loop's accounting),
    as with one drafter. ``drafters``: one entry per drafter row (each drafter, and its other loop with ``--loop
    both``) with its kind, layers, parameters, path, block size, τ, acceptance by position, speedup over the one
    autoregressive baseline (``speedup_over``) and greedy match. ``baselines``: one entry per baseline (and the
    first drafter's other loop, where it has always been). Then per-prompt outputs, the config, the table rows
    :func:`format_table` prints and, for a benchmark ``(name, prompts, source)`` whose prompts are ``prompt_ids`` in
    order, its per-category section (:func:`benchmark_section`) with every prompt's id, category and turn."""
    configs = list(configs or [cfg] * len(drafters))
    first = drafters[0]
    ar, spec = runs[AR], runs[first.key]
    greedy = cfg.temperature == 0
    stats = spec_stats(spec.results, cfg.block_size)
    drafter_match = [a == b for a, b in zip(spec.outputs, ar.outputs)]
    headline = ("tau", "tau_histogram", "acceptance_by_position", "forwards_per_token")
    report: dict[str, Any] = {
        "label": spec.label,
        **{k: stats[k] for k in headline},
        "ar_tokens_per_s": ar.tokens_per_s,
        "spec_tokens_per_s": spec.tokens_per_s,
        "speedup": spec.tokens_per_s / ar.tokens_per_s if ar.tokens_per_s > 0 else 0.0,
        "speedup_ci": _speedups(spec, ar),
        "greedy_match": all(drafter_match) if greedy else None,
        "repetition_rate": repetition_rate(ar.outputs),
        **{k: stats[k] for k in stats if k not in headline},
    }
    keys = drafter_keys(drafters, runs)
    report["drafters"] = {}
    for d, dcfg in zip(drafters, configs):
        for key in (d.key, d.other_key):
            if key in runs:
                report["drafters"][key] = {**d.describe(), "drafter": d.key, **_method_entry(key, runs[key], ar, dcfg),
                                           "block_size": dcfg.block_size, "trained_block_size": int(d.meta.block_size),
                                           "speedup_over": AR}
    report["baselines"] = {name: _method_entry(name, run, ar, cfg) for name, run in runs.items()
                           if name not in (AR, first.key) and (name == first.other_key or name not in keys)}
    report["per_prompt"] = [
        {"index": i, "prompt_tokens": len(p), "ar_ids": ar.outputs[i], "spec_ids": spec.outputs[i],
         "match": drafter_match[i], "tau": spec.results[i].tau, "hit_eos": spec.results[i].hit_eos,
         "drafters": {k: {"match": runs[k].outputs[i] == ar.outputs[i], "tau": runs[k].results[i].tau}
                      for k in keys}}
        for i, p in enumerate(prompt_ids)
    ]
    meta = first.meta
    report["config"] = {
        "loop": cfg.loop,
        "fused": dataclasses.asdict(cfg.fused) if cfg.loop in ("fused", "both") else None,
        "compile": cfg.compile,
        "block_size": cfg.block_size,
        "trained_block_size": int(meta.block_size),
        "scope": getattr(meta, "scope", None),
        "mask_token_id": meta.mask_token_id,
        "base_model": getattr(meta, "base_model", ""),
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "repeats": cfg.repeats,
        "baselines": cfg.baselines,
        "seed": cfg.seed,
        "num_prompts": len(prompt_ids),
        "eos_token_ids": eos,
        "ar_tokens": ar.tokens[0],
        "spec_tokens": spec.tokens[0],
        "num_drafters": len(drafters),
        # one target model, one KV-cache convention and one AR baseline for every row: LoRA adapters swapped into
        # the model between generations (outside the timings), standalone drafters verifying on it adapter-off
        "speedup_over": AR,
    }
    report["table"] = _table_rows(report, keys)
    if benchmark is not None:
        name, prompts, source = benchmark
        widths = {k: c.block_size for d, c in zip(drafters, configs) for k in (d.key, d.other_key)}
        report["benchmark"] = benchmark_section(runs, name, prompts, source, cfg.block_size, widths=widths,
                                                order=[r["method"] for r in report["table"]])
        for entry, p in zip(report["per_prompt"], prompts):
            entry.update(p.meta())
            if p.turn > 1:  # the target's own answers the turn follows (as Spec-Bench builds MT-Bench's turn 2)
                entry["context_answers"] = [m["content"] for m in p.prompt if m["role"] == "assistant"]
    return report


def benchmark_section(runs: dict[str, Runs], name: str, prompts: Sequence[BenchPrompt], source: dict | None,
                      block_size: int, widths: dict[str, int] | None = None,
                      order: Sequence[str] | None = None) -> dict[str, Any]:
    """The report's ``benchmark`` section (:func:`dflash_ds.evaluate.benchmarks.benchmark_report`): τ, speedup over the
    autoregressive baseline and acceptance by draft position, with intervals, per category, per turn and overall,
    for every method, from each method's per-prompt results and timings (``prompts[i]`` was decoded as prompt i).
    ``widths``: a method's block size where it is not ``block_size`` (drafters of other block sizes); ``order``:
    the methods' order (the table's; default the drafter, then the baselines)."""
    if len(prompts) != len(runs[AR].outputs):
        raise ValueError(f"{len(prompts)} benchmark prompts for {len(runs[AR].outputs)} decoded prompts")
    widths = widths or {}
    first = [m for m in (order or TABLE_ORDER) if m in runs and m != AR]
    order = [AR, *first, *(m for m in runs if m != AR and m not in first)]
    records = {}
    for m in order:
        run, width = runs[m], (None if m == AR else widths.get(m, block_size))  # AR drafts nothing: no acceptance
        records[m] = [dataclasses.replace(prompt_record(res, secs, width), round_tokens=list(toks))
                      for res, secs, toks in zip(run.results, run.prompt_seconds, run.prompt_tokens)]
    section = benchmark_report(name, prompts, records, source=source, baseline=AR)
    section["labels"] = {m: runs[m].label for m in order}
    return section


def _table_rows(report: dict[str, Any], keys: Sequence[str] = (DRAFTER,)) -> list[dict[str, Any]]:
    def row(method: str, entry: dict[str, Any], tau, speedup, ci) -> dict[str, Any]:
        out = {"method": method, "label": entry["label"], "tau": tau, "tokens_per_s": entry["tokens_per_s"],
               "speedup": speedup, "speedup_ci": ci, "greedy_match": entry["greedy_match"],
               "tokens_per_forward": entry.get("tokens_per_forward"), "loop": entry.get("loop")}
        if "kind" in entry:  # a drafter's row: what it is
            out.update({k: entry.get(k) for k in ("kind", "layers", "parameters")})
        return out

    rows = [row(k, e, e["tau"], e["speedup"], e["speedup_ci"]["ci95"])
            for k in keys if (e := report["drafters"].get(k)) is not None]
    for name in TABLE_ORDER:
        b = report["baselines"].get(name)
        if b is not None and name not in keys:
            rows.append(row(name, b, b.get("tau"), b["speedup"], b["speedup_ci"]["ci95"]))
    ar = {"label": "autoregressive (our engine)", "tokens_per_s": report["ar_tokens_per_s"], "tokens_per_forward": 1.0,
          "greedy_match": True if report["greedy_match"] is not None else None}
    rows.append(row(AR, ar, 1.0, 1.0, None))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Printed tables
# --------------------------------------------------------------------------------------------------------------


def _num(x, fmt) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(report: dict[str, Any]) -> str:
    """The printed summary: one row per method (tau, tokens per forward, tokens/s, speedup with its 95% interval,
    greedy == AR), then the drafter's loop accounting, the spread of tau and how much the target loops."""
    width = max([36, *(len(r["label"]) for r in report["table"])])
    header = f"{'method':<{width}} {'tau':>5} {'tok/fwd':>7} {'tok/s':>8} {'speedup':>8} {'95% CI':>14} {'=AR':>4}"
    lines = [header, "-" * len(header)]
    for r in report["table"]:
        ci = r["speedup_ci"]
        ci_s = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"
        match = {True: "yes", False: "NO", None: "-"}[r["greedy_match"]]
        lines.append(f"{r['label']:<{width}} {_num(r['tau'], '5.2f')} {_num(r['tokens_per_forward'], '7.2f')} "
                     f"{_num(r['tokens_per_s'], '8.1f')} {_num(r['speedup'], '7.2f')}x {ci_s:>14} {match:>4}")
    drafters = report.get("drafters") or {}
    if len({e.get("drafter") for e in drafters.values()}) > 1:  # several drafters: what each one is, and drafts
        lines.append("drafters (speedups over the one autoregressive baseline above):")
        for key, e in drafters.items():
            acc = " ".join(_num(a, ".2f") for a in e.get("acceptance_by_position") or ())
            params = e.get("parameters")
            lines.append(f"  {key}: {e.get('name') or key}, {e['kind']}, {e.get('layers') or '?'}, "
                         f"{'?' if params is None else format(params, ',')} parameters, {e['loop']} loop, "
                         f"B={e['block_size']}: tau {_num(e['tau'], '.2f')}, acceptance by position {acc}")
    pp = report["tau_per_prompt"]
    ci = pp["ci95_median"]
    extra = [
        f"drafter: {report['loop']} loop, {_num(report['forwards_per_step'], '.2f')} forwards per step, "
        f"{_num(report['rows_per_forward'], '.1f')} rows per forward, "
        f"fallback rate {_num(report['fallback_rate'], '.2f')}",
        f"tau per prompt: median {_num(pp['median'], '.2f')}"
        + (f" (95% bootstrap CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""),
        f"tau first {SPLIT_AT} tokens {_num(report['tau_first_32'], '.2f')}, rest {_num(report['tau_rest'], '.2f')}; "
        f"target greedy 4-gram repetition rate {report['repetition_rate']:.1%}",
    ]
    ranks = report["config"].get("eval_ranks", 1)
    if ranks > 1:
        extra.append(f"{ranks} processes decoded the prompts side by side ({report['config'].get('torch_threads')} "
                     "thread(s) each): tok/s is one stream's rate while they share the machine")
    return "\n".join(lines + extra)


def format_benchmark(report: dict[str, Any]) -> str:
    """The benchmark's per-category table (:func:`dflash_ds.evaluate.benchmarks.format_benchmark_table`) under a line naming
    the set, its questions and prompts; empty for a report without a benchmark."""
    section = report.get("benchmark")
    if not section:
        return ""
    labels = section.get("labels") or {r["method"]: r["label"] for r in report.get("table", ())}
    def count(n: int, what: str) -> str:
        return f"{n} {what}{'' if n == 1 else 's'}"

    turns = f", {count(len(section['by_turn']), 'turn')}" if section.get("by_turn") else ""
    head = (f"{section['name']}: {count(section['num_questions'], 'question')}, "
            f"{count(section['num_prompts'], 'prompt')}{turns}; tau and speedup over autoregressive per category")
    return head + "\n" + format_benchmark_table(section, labels)
