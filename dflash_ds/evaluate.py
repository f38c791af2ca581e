"""``dflash-ds eval``: speculative decoding against the baselines a user would pick instead (issues 4 and 7).

On the same model, prompts and engine, in the same run, this measures

* the trained drafter through dflash-ds's verify loop (:mod:`dflash_ds.speculative`): τ, its histogram, acceptance
  by block position, forwards per token, tokens/s and speedup over the autoregressive baseline;
* the autoregressive baseline on the same engine (one adapter-off forward per token);
* baselines (``--baselines none|fast|all``): ``fast`` = prompt lookup through transformers'
  ``generate(prompt_lookup_num_tokens=K)`` + the untrained adapter (the floor); ``all`` adds the same n-gram
  drafter through dflash-ds's own loop (engine vs drafter effects) and transformers' plain greedy ``generate``;
* how much the target loops: the repetition rate of its greedy output and τ over the first 32 generated tokens
  versus the rest;
* spread: per-prompt τ with median and 95% bootstrap intervals, and the speedup's interval over ``--repeats``
  timing runs.

:func:`run_eval` is the reusable entry point (the trainer calls it with its in-memory model); :func:`main` is the
command line.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .data import TEXT_ROLE, conversation_of, parse_json_object, render_chat
from .speculative import (
    FALLBACKS,
    FusedConfig,
    LoRABlockDrafter,
    NgramDrafter,
    SpecResult,
    StaticDecoding,
    autoregressive_generate,
    eos_ids_of,
    fused_generate,
    speculative_generate,
    unwrap_model,
    untrained_floor_drafter,
)

BASELINE_CHOICES = ("none", "fast", "all")
SPLIT_AT = 32  # tau is split into steps that start within the first 32 generated tokens and the rest

# method keys, in table order
DRAFTER = "drafter"
DRAFTER_OTHER_LOOP = "drafter_other_loop"  # the drafter through the loop --loop did not pick (with --loop both)
NGRAM = "ngram"
PROMPT_LOOKUP = "prompt_lookup_hf"
FLOOR = "untrained_floor"
HF_GREEDY = "hf_greedy"
AR = "autoregressive"
TABLE_ORDER = (DRAFTER, DRAFTER_OTHER_LOOP, NGRAM, PROMPT_LOOKUP, FLOOR, HF_GREEDY)
LOOP_CHOICES = ("auto", "fused", "two_forward", "both")
LOOP_LABELS = {"fused": "fused loop", "two_forward": "two-forward loop"}
COMPILE_CHOICES = ("none", "static", "compile")


def default_loop(device: torch.device) -> str:
    """The drafter's loop when both run: the one that measured faster where it was measured. On a CPU the
    two-forward loop (a fused forward's extra rows cost compute there: docs/benchmarks.md); on a GPU the fused loop,
    whose extra rows are nearly free at batch 1 (one forward per step instead of a draft and a verify)."""
    return "fused" if device.type == "cuda" else "two_forward"


def compile_mode(model: nn.Module) -> str | None:
    """``reduce-overhead`` (CUDA graphs) on a GPU, where launch overhead is most of a decode forward at batch 1;
    inductor's default elsewhere."""
    return "reduce-overhead" if next(model.parameters()).device.type == "cuda" else None


class PromptFileError(ValueError):
    """A malformed prompt line; the message reads ``path:line: reason``."""


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------


def _parse_prompt(line: bytes) -> list[dict] | str:
    """A conversation whose last turn is the user's, a ``{"prompt": str}`` record, or a pre-formatted ``text``."""
    record = parse_json_object(line)
    if not any(k in record for k in ("conversations", "messages", "text")):
        if isinstance(record.get("prompt"), str) and record["prompt"].strip():
            return [{"role": "user", "content": record["prompt"]}]
        raise ValueError("missing 'conversations' or 'messages' (or a non-empty 'prompt'/'text' string)")
    out = conversation_of(record, require_assistant=False)
    if out[0]["role"] == TEXT_ROLE:
        return out[0]["content"]  # pre-formatted: used as is, no chat template
    if out[-1]["role"] != "user":
        raise ValueError(
            f"the last turn must be the user's (got {out[-1]['role']!r}): a prompt file holds conversations "
            "to be answered, without the assistant reply"
        )
    return out


def read_prompts(path: str | os.PathLike) -> list[list[dict] | str]:
    """Read a JSONL prompt file: ``{"conversations"|"messages": [...]}`` with the user's turn last, a
    ``{"prompt": "..."}`` (one user turn) or a pre-formatted ``{"text": "..."}``. Blank lines are skipped; a bad line
    raises :class:`PromptFileError` naming ``file:line``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: prompt file not found")
    prompts: list[list[dict] | str] = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number, like a training file
        for lineno, line in enumerate(f, start=1):
            if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8) :]
            if not line.strip():
                continue
            try:
                prompts.append(_parse_prompt(line))
            except ValueError as exc:
                raise PromptFileError(f"{path}:{lineno}: {exc}") from None
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts


def load_prompts(path: str | os.PathLike, tokenizer, limit: int | None = None) -> list[list[int]]:
    """Read a prompt file (:func:`read_prompts`), keep the first ``limit`` prompts, render them to token ids."""
    prompts = read_prompts(path)
    if limit is not None:
        prompts = prompts[:limit]
    return [render_prompt(tokenizer, p) for p in prompts]


def render_prompt(tokenizer, prompt: list[dict] | str | Sequence[int]) -> list[int]:
    """Token ids of one prompt: a conversation through the chat template (generation prompt added), a
    pre-formatted string as is, or token ids unchanged."""
    if isinstance(prompt, str):
        text = prompt
    elif prompt and isinstance(prompt[0], int):
        return [int(x) for x in prompt]  # type: ignore[arg-type]
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; give prompts as pre-formatted {'text': ...} lines")
        text = render_chat(tokenizer, list(prompt), add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prompt renders to no tokens: {text!r}")
    return list(ids)


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------

# two-sided 95% Student t quantiles, df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% Student-t interval of a few repeated measurements (the interval is null for one value)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "min": None, "max": None, "n": 0}
    mean = sum(values) / n
    ci = None
    if n > 1:
        half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * statistics.stdev(values) / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {"mean": mean, "ci95": ci, "min": min(values), "max": max(values), "n": n}


def bootstrap_ci(values: Sequence[float], stat: str = "mean", num: int = 2000, seed: int = 0) -> list[float] | None:
    """Percentile 95% bootstrap interval of the mean or median of ``values`` (None for fewer than 2 values)."""
    if len(values) < 2:
        return None
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (num, len(values)), generator=gen)
    samples = x[idx]
    stats = samples.mean(dim=1) if stat == "mean" else samples.median(dim=1).values
    lo, hi = torch.quantile(stats, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [lo, hi]


def repetition_counts(token_ids: Sequence[int], n: int = 4) -> tuple[int, int]:
    """(n-grams that already occurred earlier in the same sequence, all n-grams)."""
    seen: set[tuple[int, ...]] = set()
    repeated = total = 0
    for i in range(len(token_ids) - n + 1):
        gram = tuple(token_ids[i : i + n])
        total += 1
        repeated += gram in seen
        seen.add(gram)
    return repeated, total


def _tau_split(results: Sequence[SpecResult], split: int = SPLIT_AT) -> tuple[float | None, float | None]:
    sums = [[0, 0], [0, 0]]  # [tokens, steps] for steps starting before / at-or-after `split`
    for r in results:
        for start, committed in zip(r.step_starts, r.committed_per_step):
            bucket = sums[0] if start < split else sums[1]
            bucket[0] += committed
            bucket[1] += 1
    return tuple(b[0] / b[1] if b[1] else None for b in sums)  # type: ignore[return-value]


LOOP_STATS = ("loop", "forwards_per_step", "tokens_per_forward", "rows_per_forward", "fallback_rate")


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


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


class _Run:
    """One method's generations (first repeat) and its timing over all repeats."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.results: list[Any] = []  # SpecResult, or dicts for transformers' generate
        self.outputs: list[list[int]] = []
        self.tokens = [0]  # per repeat
        self.times = [0.0]
        self.forwards = 0

    def new_repeat(self) -> None:
        self.tokens.append(0)
        self.times.append(0.0)

    def add(self, repeat: int, output: list[int], seconds: float, result: Any = None, forwards: int = 0) -> None:
        self.tokens[-1] += len(output)
        self.times[-1] += seconds
        if repeat == 0:
            self.outputs.append(output)
            self.results.append(result)
            self.forwards += forwards

    @property
    def tokens_per_s(self) -> float:
        t = sum(self.times)
        return sum(self.tokens) / t if t > 0 else 0.0

    def rates(self) -> list[float]:
        return [n / t if t > 0 else 0.0 for n, t in zip(self.tokens, self.times)]


@dataclass
class Method:
    """One decoder in the comparison. ``run(prompt, generator, max_new_tokens)`` returns ``(new ids, seconds,
    result, forwards)``: ``result`` a :class:`SpecResult` for dflash-ds's loops, a dict for transformers'
    ``generate``."""

    name: str
    label: str
    run: Callable[[list[int], torch.Generator | None, int], tuple[list[int], float, Any, int]]


def _hf_generate(model: nn.Module, prompt: list[int], *, max_new_tokens: int, eos: list[int], pad: int,
                 prompt_lookup: int | None) -> tuple[list[int], float, int]:
    """transformers' own greedy ``generate`` (optionally with prompt lookup): (new ids, seconds, forwards)."""
    count = [0]
    hook = model.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    ids = torch.tensor([prompt], dtype=torch.long, device=next(model.parameters()).device)
    kwargs: dict[str, Any] = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos or None,
        pad_token_id=pad,
    )
    if prompt_lookup:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup
    control = getattr(model, "dflash_adapter", None)
    try:
        with torch.no_grad(), (control.disabled() if control is not None else contextlib.nullcontext()):
            t0 = time.perf_counter()
            out = model.generate(ids, **kwargs)
            seconds = time.perf_counter() - t0
    finally:
        hook.remove()
    new = out[0, len(prompt) :].tolist()
    for i, tok in enumerate(new):
        if tok in eos:
            new = new[: i + 1]
            break
    return new, seconds, count[0]


def build_methods(model: nn.Module, meta, *, block_size: int, loop: str, baselines: str, greedy: bool,
                  temperature: float, eos: list[int], pad: int, prompt_lookup_tokens: int,
                  fused: FusedConfig | None = None, static: StaticDecoding | None = None) -> list[Method]:
    """The decoders of one evaluation, the autoregressive baseline first (speedups are measured against it). With
    ``static``, dflash-ds's loops (AR included) share one static, possibly compiled, cache."""
    B = block_size

    def ours(drafter_factory) -> Callable:
        def run(prompt, gen, n_new):
            r = speculative_generate(model, prompt, drafter_factory(), block_size=B, max_new_tokens=n_new,
                                     eos_token_ids=eos, temperature=temperature, generator=gen, static=static)
            return r.output_ids, r.wall_time, r, r.verify_forwards + r.draft_forwards
        return run

    def fused_run(prompt, gen, n_new):
        r = fused_generate(model, prompt, meta.mask_token_id, block_size=B, max_new_tokens=n_new, eos_token_ids=eos,
                           temperature=temperature, generator=gen, config=fused, static=static)
        return r.output_ids, r.wall_time, r, r.verify_forwards + r.draft_forwards

    def hf(prompt_lookup: int | None) -> Callable:
        def run(prompt, gen, n_new):
            new, secs, fwd = _hf_generate(model, prompt, max_new_tokens=n_new, eos=eos, pad=pad,
                                          prompt_lookup=prompt_lookup)
            return new, secs, {"forwards": fwd, "tokens": len(new)}, fwd
        return run

    def ar(prompt, gen, n_new):
        r = autoregressive_generate(model, prompt, max_new_tokens=n_new, eos_token_ids=eos, temperature=temperature,
                                    generator=gen, static=static)
        return r.output_ids, r.wall_time, r, r.verify_forwards

    if loop != "two_forward" and meta.scope != "block":
        raise ValueError(f"--loop {loop}: the fused loop needs a scope 'block' adapter (this one is "
                         f"{meta.scope!r}); use --loop two_forward")
    loops = {"fused": fused_run, "two_forward": ours(lambda: LoRABlockDrafter(meta.mask_token_id, meta.scope))}
    first = loop if loop != "both" else default_loop(next(model.parameters()).device)
    methods = [Method(AR, "autoregressive (our engine)", ar),
               Method(DRAFTER, f"drafter ({LOOP_LABELS[first]})", loops[first])]
    if loop == "both":
        other = "two_forward" if first == "fused" else "fused"
        methods.append(Method(DRAFTER_OTHER_LOOP, f"drafter ({LOOP_LABELS[other]})", loops[other]))
    if baselines in ("fast", "all"):
        if greedy:
            methods.append(Method(PROMPT_LOOKUP, "prompt lookup (transformers)", hf(prompt_lookup_tokens)))
        methods.append(Method(FLOOR, "untrained adapter (floor)",
                              ours(lambda: untrained_floor_drafter(meta.mask_token_id))))
    if baselines == "all":
        methods.append(Method(NGRAM, "n-gram lookup (our loop)", ours(NgramDrafter)))
        if greedy:
            methods.append(Method(HF_GREEDY, "greedy (transformers)", hf(None)))
    return methods


def run_eval(
    model: nn.Module,
    tokenizer,
    meta,
    prompts: Sequence[list[dict] | str | Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    block_size: int | None = None,
    repeats: int = 3,
    baselines: str = "fast",
    loop: str = "auto",
    fused: FusedConfig | None = None,
    compile: str = "none",
    seed: int = 0,
    prompt_lookup_tokens: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    progress: bool = True,
    warmup: bool = True,
) -> dict[str, Any]:
    """Evaluate the adapter on ``model`` (fitted with :func:`dflash_ds.lora.apply_lora` / ``load_adapter_dir``).

    ``meta`` is the adapter's :class:`dflash_ds.lora.DraftMeta` (block size, MASK id, scope). ``prompts`` are
    conversations (last turn user), pre-formatted strings or token-id lists. ``loop``: the drafter's decoding loop
    (``fused``: one forward per step; ``two_forward``: a draft and a verify forward; ``both``: side by side, the
    drafter's row in the loop :func:`default_loop` picks for the device; ``auto``: ``both`` for scope ``block``
    adapters, else ``two_forward``, the only loop scope ``all`` has). ``compile``: ``none`` (dynamic cache, eager), ``static`` (a
    static cache, eager) or ``compile`` (a static cache and a ``torch.compile``-d decoder; on a GPU CUDA graphs too),
    for dflash-ds's loops and the AR baseline alike. Every method runs on every prompt in each of ``repeats``
    timing rounds, interleaved prompt by prompt so drift hits all methods alike; τ and outputs come from the first
    round (the runs are seeded, so every round generates the same tokens). Returns the report dict (see the module
    docstring and :func:`format_table`). The model's train/eval mode and adapter switch are restored.
    """
    if baselines not in BASELINE_CHOICES:
        raise ValueError(f"--baselines must be one of {'/'.join(BASELINE_CHOICES)}, got {baselines!r}")
    if loop not in LOOP_CHOICES:
        raise ValueError(f"--loop must be one of {'/'.join(LOOP_CHOICES)}, got {loop!r}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if loop == "auto":
        loop = "both" if meta.scope == "block" else "two_forward"
    trained_block = int(meta.block_size)
    B = int(block_size or trained_block)
    lowest = 2 if loop == "two_forward" else 3
    if not lowest <= B <= trained_block:
        raise ValueError(f"--block-size must be in [{lowest}, {trained_block}] (the adapter was trained with "
                         f"{trained_block}{'; the fused loop drafts positions 2 .. B-1' if lowest == 3 else ''})")
    K = int(prompt_lookup_tokens or B - 1)
    hf_model = unwrap_model(model)
    eos = sorted(set(eos_token_ids)) if eos_token_ids is not None else eos_ids_of(tokenizer, hf_model)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    prompt_ids = [render_prompt(tokenizer, p) for p in prompts]
    if not prompt_ids:
        raise ValueError("no prompts to evaluate")
    greedy = temperature == 0
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"--compile must be one of {'/'.join(COMPILE_CHOICES)}, got {compile!r}")
    static = None
    if compile != "none":
        if meta.scope != "block":
            raise ValueError("--compile static/compile needs a scope 'block' adapter (scope 'all' keeps a second cache)")
        static = StaticDecoding(hf_model, max(map(len, prompt_ids)) + max_new_tokens + 2 * B * (B + 2),
                                compile=compile == "compile", mode=compile_mode(hf_model))
    methods = build_methods(hf_model, meta, block_size=B, loop=loop, baselines=baselines, greedy=greedy,
                            temperature=temperature, eos=eos, pad=pad, prompt_lookup_tokens=K, fused=fused,
                            static=static)
    runs = {m.name: _Run(m.label) for m in methods}
    device = next(hf_model.parameters()).device

    def gen_for(i: int) -> torch.Generator | None:
        return None if greedy else torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)

    control = getattr(hf_model, "dflash_adapter", None)
    was_training = hf_model.training
    hf_model.eval()
    try:
        with control.preserved() if control is not None else contextlib.nullcontext():
            if warmup:  # one-time costs (lazy init, mask functions, compiling every shape) stay out of the timings
                for m in methods:
                    m.run(prompt_ids[0], gen_for(0), max_new_tokens if compile == "compile" else min(8, max_new_tokens))
            bar = _progress(repeats * len(prompt_ids), progress)
            for rep in range(repeats):
                if rep:
                    for run in runs.values():
                        run.new_repeat()
                for i, prompt in enumerate(prompt_ids):
                    for m in methods:
                        runs[m.name].add(rep, *m.run(prompt, gen_for(i), max_new_tokens))
                    bar.update(1)
            bar.close()
    finally:
        hf_model.train(was_training)
    config = {"loop": loop, "fused": dataclasses.asdict(fused or FusedConfig()) if loop != "two_forward" else None,
              "compile": compile}
    return _build_report(runs, prompt_ids, B, trained_block, K, meta, greedy, temperature, max_new_tokens,
                         repeats, baselines, seed, eos, config)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="dflash-ds eval", unit="prompt", disable=not enabled, file=sys.stderr)


def _build_report(runs, prompt_ids, B, trained_block, K, meta, greedy, temperature, max_new_tokens, repeats,
                  baselines, seed, eos, loop_config) -> dict[str, Any]:
    ar, spec = runs[AR], runs[DRAFTER]
    ar_tps = ar.tokens_per_s

    def speedups(run: _Run) -> dict[str, Any]:
        return t_interval([r / a if a > 0 else 0.0 for r, a in zip(run.rates(), ar.rates())])

    def matches(run: _Run) -> list[bool]:
        return [a == b for a, b in zip(run.outputs, ar.outputs)]

    stats = spec_stats(spec.results, B)
    rep_total = [0, 0]
    for out in ar.outputs:
        r, t = repetition_counts(out)
        rep_total[0] += r
        rep_total[1] += t
    drafter_match = matches(spec)
    report: dict[str, Any] = {
        "label": spec.label,
        **{k: stats[k] for k in ("tau", "tau_histogram", "acceptance_by_position", "forwards_per_token")},
        "ar_tokens_per_s": ar_tps,
        "spec_tokens_per_s": spec.tokens_per_s,
        "speedup": spec.tokens_per_s / ar_tps if ar_tps > 0 else 0.0,
        "speedup_ci": speedups(spec),
        "greedy_match": all(drafter_match) if greedy else None,
        "repetition_rate": rep_total[0] / rep_total[1] if rep_total[1] else 0.0,
        **{k: stats[k] for k in stats if k not in ("tau", "tau_histogram", "acceptance_by_position",
                                                   "forwards_per_token")},
    }
    baseline_report: dict[str, Any] = {}
    for name, run in runs.items():
        if name in (AR, DRAFTER):
            continue
        entry: dict[str, Any] = {"label": run.label, "tokens_per_s": run.tokens_per_s}
        entry["speedup"] = run.tokens_per_s / ar_tps if ar_tps > 0 else 0.0
        entry["speedup_ci"] = speedups(run)
        if isinstance(run.results[0], SpecResult):
            s = spec_stats(run.results, B)
            entry.update({k: s[k] for k in ("tau", "tau_histogram", "acceptance_by_position", "forwards_per_token",
                                            "tau_first_32", "tau_rest", "tau_per_prompt", *LOOP_STATS)})
        else:
            forwards = sum(r["forwards"] for r in run.results)
            tokens = sum(r["tokens"] for r in run.results)
            # transformers' first forward (the prefill) already yields a token, so every forward counts
            entry["tau"] = tokens / forwards if forwards else 0.0
            entry["forwards_per_token"] = forwards / tokens if tokens else None
        if name == PROMPT_LOOKUP:
            entry["prompt_lookup_num_tokens"] = K
        m = matches(run)
        entry["greedy_match"] = all(m) if greedy else None
        entry["mismatched_prompts"] = [i for i, ok in enumerate(m) if not ok] if greedy else None
        baseline_report[name] = entry
    report["baselines"] = baseline_report
    report["per_prompt"] = [
        {
            "index": i,
            "prompt_tokens": len(p),
            "ar_ids": ar.outputs[i],
            "spec_ids": spec.outputs[i],
            "match": drafter_match[i],
            "tau": spec.results[i].tau,
            "hit_eos": spec.results[i].hit_eos,
        }
        for i, p in enumerate(prompt_ids)
    ]
    report["config"] = {
        **loop_config,
        "block_size": B,
        "trained_block_size": trained_block,
        "scope": meta.scope,
        "mask_token_id": meta.mask_token_id,
        "base_model": getattr(meta, "base_model", ""),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "repeats": repeats,
        "baselines": baselines,
        "seed": seed,
        "num_prompts": len(prompt_ids),
        "eos_token_ids": eos,
        "ar_tokens": ar.tokens[0],
        "spec_tokens": spec.tokens[0],
        "torch_threads": torch.get_num_threads(),
    }
    report["table"] = _table_rows(report)
    return report


def _table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    def row(method: str, entry: dict[str, Any], tau, speedup, ci) -> dict[str, Any]:
        return {"method": method, "label": entry["label"], "tau": tau, "tokens_per_s": entry["tokens_per_s"],
                "speedup": speedup, "speedup_ci": ci, "greedy_match": entry["greedy_match"],
                "tokens_per_forward": entry.get("tokens_per_forward"), "loop": entry.get("loop")}

    rows = [row(DRAFTER, {**report, "tokens_per_s": report["spec_tokens_per_s"]}, report["tau"], report["speedup"],
                report["speedup_ci"]["ci95"])]
    for name in TABLE_ORDER[1:]:
        b = report["baselines"].get(name)
        if b is not None:
            rows.append(row(name, b, b.get("tau"), b["speedup"], b["speedup_ci"]["ci95"]))
    ar = {"label": "autoregressive (our engine)", "tokens_per_s": report["ar_tokens_per_s"], "tokens_per_forward": 1.0,
          "greedy_match": True if report["greedy_match"] is not None else None}
    rows.append(row(AR, ar, 1.0, 1.0, None))
    return rows


def format_table(report: dict[str, Any]) -> str:
    """The printed summary: one row per method (tau, tokens per forward, tokens/s, speedup with its 95% interval,
    greedy == AR), then the drafter's loop accounting, the spread of tau and how much the target loops."""

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    header = f"{'method':<36} {'tau':>5} {'tok/fwd':>7} {'tok/s':>8} {'speedup':>8} {'95% CI':>14} {'=AR':>4}"
    lines = [header, "-" * len(header)]
    for r in report["table"]:
        ci = r["speedup_ci"]
        ci_s = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"
        match = {True: "yes", False: "NO", None: "-"}[r["greedy_match"]]
        lines.append(f"{r['label']:<36} {num(r['tau'], '5.2f')} {num(r['tokens_per_forward'], '7.2f')} "
                     f"{num(r['tokens_per_s'], '8.1f')} {num(r['speedup'], '7.2f')}x {ci_s:>14} {match:>4}")
    pp = report["tau_per_prompt"]
    ci = pp["ci95_median"]
    extra = [
        f"drafter: {report['loop']} loop, {num(report['forwards_per_step'], '.2f')} forwards per step, "
        f"{num(report['rows_per_forward'], '.1f')} rows per forward, fallback rate {num(report['fallback_rate'], '.2f')}",
        f"tau per prompt: median {num(pp['median'], '.2f')}"
        + (f" (95% bootstrap CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""),
        f"tau first {SPLIT_AT} tokens {num(report['tau_first_32'], '.2f')}, rest {num(report['tau_rest'], '.2f')}; "
        f"target greedy 4-gram repetition rate {report['repetition_rate']:.1%}",
    ]
    return "\n".join(lines + extra)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dflash-ds eval",
        description="Speculative decoding with a dflash-ds adapter against the autoregressive baseline, prompt "
        "lookup and the untrained-adapter floor, on the same model and engine, in one run.",
    )
    p.add_argument("--model-path", required=True, help="the target model directory (from_pretrained)")
    p.add_argument("--adapter", required=True, help="an adapter directory exported by dflash-ds (dflash.json)")
    p.add_argument("--prompts", required=True, help="JSONL conversations, last turn user")
    p.add_argument("--report", required=True, help="where to write the JSON report")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--block-size", type=int, default=None, help="draft block size (default: the trained one)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first K prompts")
    p.add_argument("--repeats", type=int, default=3, help="timing rounds for the speedup interval (default 3)")
    p.add_argument("--baselines", choices=BASELINE_CHOICES, default="fast")
    p.add_argument("--loop", choices=LOOP_CHOICES, default="auto",
                   help="the drafter's decoding loop: fused (one forward per step), two_forward (draft, then "
                   "verify), both side by side (the drafter row: two_forward on a CPU, fused on a GPU, as measured), "
                   "or auto (default): both for scope block adapters, two_forward for scope all")
    p.add_argument("--fused-groups", type=_groups_arg, default=None, metavar="N|all",
                   help="fused loop: draft groups per forward (default all: one per possible outcome)")
    p.add_argument("--fused-fallback", choices=FALLBACKS, default=FusedConfig.fallback,
                   help="fused loop, when no group matches the outcome: refill (the next forward drafts afresh) "
                   "or draft (one draft-only forward)")
    p.add_argument("--compile", choices=COMPILE_CHOICES, default="none",
                   help="decode forwards on a static KV cache (static), and torch.compile-d (compile; CUDA graphs on a "
                   "GPU): for dflash-ds's loops and the AR baseline alike, scope block only (default none)")
    p.add_argument("--fused-reject-mismatch", action="store_true",
                   help="fused loop: drop a group's drafts when its guess for the bonus slot was wrong")
    p.add_argument("--prompt-lookup-tokens", type=int, default=None, help="K for prompt lookup (default B-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _groups_arg(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of groups or 'all', got {value!r}") from None


def fused_config_from_args(args: argparse.Namespace) -> FusedConfig:
    return FusedConfig(groups=args.fused_groups, fallback=args.fused_fallback,
                       reject_mismatch=args.fused_reject_mismatch)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dflash-ds eval: error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lora import load_adapter_dir

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.model_path).is_dir():
        raise FileNotFoundError(f"{args.model_path}: model directory not found")
    prompts = read_prompts(args.prompts)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype,
                                                 attn_implementation=args.attn_implementation)
    meta = load_adapter_dir(model, args.adapter, stack=args.compile != "compile")  # compiled graphs fuse on their own
    if not 0 <= meta.mask_token_id < model.config.vocab_size:
        raise ValueError(f"{args.adapter}: MASK id {meta.mask_token_id} is outside this model's vocabulary "
                         f"({model.config.vocab_size}): an adapter trained on another base model?")
    model.to(device).eval()
    report = run_eval(
        model,
        tokenizer,
        meta,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        block_size=args.block_size,
        repeats=args.repeats,
        baselines=args.baselines,
        loop=args.loop,
        fused=fused_config_from_args(args),
        compile=args.compile,
        seed=args.seed,
        prompt_lookup_tokens=args.prompt_lookup_tokens,
        progress=not args.no_progress,
    )
    report["config"].update(
        model_path=str(args.model_path), adapter=str(args.adapter), prompts=str(args.prompts), device=str(device),
        dtype=str(dtype).replace("torch.", ""), attn_implementation=args.attn_implementation,
    )
    write_json_atomic(args.report, report)
    print(format_table(report))
    print(f"report written to {args.report}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
