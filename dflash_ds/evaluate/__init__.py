"""``dflash-ds eval``: speculative decoding against the baselines a user would pick instead.

On the same model, prompts and engine, in the same run, this measures

* one or several trained drafters of either kind (``--drafter DIR``, repeatable; ``--adapter DIR`` for LoRA
  adapters), each a row labelled with its kind, layers and parameters: a dflash-ds LoRA adapter through
  dflash-ds's verify loops, a standalone DFlash drafter through its own (each kind's, :mod:`dflash_ds.kinds`): τ,
  its histogram, acceptance by block position, forwards per token, tokens/s and speedup over the autoregressive
  baseline (the LoRA adapters share the one model, factors swapped in per generation);
* the autoregressive baseline on the same engine (one adapter-off forward per token), once for every row;
* baselines (``--baselines none|fast|all``): ``fast`` = prompt lookup through transformers'
  ``generate(prompt_lookup_num_tokens=K)`` + the untrained adapter (the floor); ``all`` adds the same n-gram
  drafter through dflash-ds's own loop (engine vs drafter effects) and transformers' plain greedy ``generate``;
* how much the target loops: the repetition rate of its greedy output and τ over the first 32 generated tokens
  versus the rest;
* spread: per-prompt τ with median and 95% bootstrap intervals, and the speedup's interval over ``--repeats``
  timing runs;
* on a standard set (``--benchmark humaneval|mt-bench|question.jsonl``, :mod:`.benchmarks`): τ, speedup
  and acceptance by position per category, per turn and overall, with intervals, for every method; ``--plot DIR``
  draws the report (:mod:`dflash_ds.plots`).

Modules: :mod:`.config` (:class:`EvalConfig`, method keys), :mod:`.prompts` (prompt files, rendering),
:mod:`.methods` (the comparison: baseline, each drafter's rows from its kind, the baselines), :mod:`.harness`
(:func:`run_eval`: timing rounds, shards, benchmark turns), :mod:`.report` (statistics, the report and its tables:
pure functions of the runs), :mod:`.benchmarks` (HumanEval, MT-Bench), :mod:`.cli` (:func:`main`). The drafters of
an eval are opened and loaded through the kinds' seam (:func:`dflash_ds.kinds.open_drafters`,
:func:`~dflash_ds.kinds.load_drafters`). :func:`run_eval` is the reusable entry point (the trainer calls it with its in-memory model).
"""

from .cli import build_parser, main
from .config import (
    AR, BASELINE_CHOICES, COMPILE_CHOICES, FLOOR, HF_GREEDY, LOOP_CHOICES, NGRAM, PROMPT_LOOKUP, SPLIT_AT, TABLE_ORDER,
    EvalConfig, compile_mode,
)
from .harness import as_drafters, benchmark_prompts, run_eval
from .methods import build_methods
from .prompts import PromptFileError, load_prompts, read_prompts, render_prompt
from .report import LOOP_STATS, Runs, benchmark_section, build_report, format_benchmark, format_table, spec_stats

__all__ = ["AR", "BASELINE_CHOICES", "COMPILE_CHOICES", "FLOOR", "HF_GREEDY", "LOOP_CHOICES", "LOOP_STATS", "NGRAM",
           "PROMPT_LOOKUP", "PromptFileError", "Runs", "SPLIT_AT", "TABLE_ORDER", "EvalConfig", "as_drafters",
           "benchmark_prompts", "benchmark_section", "build_methods", "build_parser", "build_report", "compile_mode",
           "format_benchmark", "format_table", "load_prompts", "main", "read_prompts", "render_prompt", "run_eval",
           "spec_stats"]
