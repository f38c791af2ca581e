"""``dflash-ds eval``: speculative decoding against the baselines a user would pick instead.

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
import dataclasses
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
from .families import check_decode_length
from .files import write_json_atomic
from .lora import adapter_disabled, adapter_preserved
from .settings import add_flags, check_choices, from_args, setting
from .stats import bootstrap_ci, repetition_rate, t_interval
from .speculative import (
    FusedConfig,
    LoRABlockDrafter,
    Lockstep,
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


@dataclass
class EvalConfig:
    """Decoding (what every method generates, and how the drafter's loop runs)."""

    max_new_tokens: int = setting(256, "tokens generated per prompt")
    temperature: float = setting(0.0, "0 = greedy; above 0 every method samples (lossless rejection sampling)")
    block_size: int | None = setting(None, "draft block size (default: the trained one)")
    repeats: int = setting(3, "timing rounds for the speedup interval")
    baselines: str = setting("fast", "none; fast: prompt lookup (transformers) and the untrained-adapter floor; all: "
                             "also the same n-gram drafter through dflash-ds's loop and transformers' greedy generate",
                             choices=BASELINE_CHOICES)
    loop: str = setting("auto", "the drafter's decoding loop: fused (one forward per step), two_forward (draft, "
                        "then verify), both side by side (the drafter row: two_forward on a CPU, fused on a GPU, as "
                        "measured), or auto: both for scope block adapters, two_forward for scope all",
                        choices=LOOP_CHOICES)
    fused: FusedConfig = dataclasses.field(default_factory=FusedConfig)
    compile: str = setting("none", "decode forwards on a static KV cache (static), and torch.compile-d (compile; CUDA "
                           "graphs on a GPU): for dflash-ds's loops and the AR baseline alike, scope block only",
                           choices=COMPILE_CHOICES)
    seed: int = setting(0, "seed of the sampled generations")
    prompt_lookup_tokens: int | None = setting(None, "K for prompt lookup (default B-1)")
    floor_tokens: int | None = setting(None, "tokens per prompt for the untrained-adapter floor (default: all of "
                                       "--max-new-tokens); at tau ~1 it costs two forwards a token, the slowest row, "
                                       "and its tau barely moves along an answer")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.floor_tokens is not None and self.floor_tokens < 1:
            raise ValueError(f"--floor-tokens must be >= 1, got {self.floor_tokens}")

    def resolved(self, meta) -> "EvalConfig":
        """This config with ``auto``/None filled for an adapter ``meta``: the loop, the block size (checked against
        the trained one) and prompt lookup's K."""
        loop = self.loop if self.loop != "auto" else ("both" if meta.scope == "block" else "two_forward")
        trained = int(meta.block_size)
        B = int(self.block_size or trained)
        lowest = 2 if loop == "two_forward" else 3
        if not lowest <= B <= trained:
            raise ValueError(f"--block-size must be in [{lowest}, {trained}] (the adapter was trained with "
                             f"{trained}{'; the fused loop drafts positions 2 .. B-1' if lowest == 3 else ''})")
        if loop != "two_forward" and meta.scope != "block":
            raise ValueError(f"--loop {loop}: the fused loop needs a scope 'block' adapter (this one is "
                             f"{meta.scope!r}); use --loop two_forward")
        if self.compile != "none" and meta.scope != "block":
            raise ValueError("--compile static/compile needs a scope 'block' adapter (scope 'all' keeps a second cache)")
        return dataclasses.replace(self, loop=loop, block_size=B, prompt_lookup_tokens=int(self.prompt_lookup_tokens or B - 1))


# --------------------------------------------------------------------------------------------------------------
# The methods compared
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One method's output for one prompt: new ids, seconds, what the loop recorded (a :class:`SpecResult`, or a dict
    for transformers' ``generate``) and the model forwards it took."""

    ids: list[int]
    seconds: float
    result: Any
    forwards: int


@dataclass
class DecodeSetup:
    """What every method of one evaluation shares: the model, the resolved config, EOS/pad ids, the adapter's
    metadata, the static cache (``--compile``) and, in a lockstep eval, the :class:`Lockstep`."""

    model: nn.Module
    config: EvalConfig
    meta: Any
    eos: list[int]
    pad: int
    static: StaticDecoding | None = None
    lockstep: Lockstep | None = None  # every rank decodes every prompt: rank 0 decides (run_eval)


class Method:
    """One decoder in the comparison: ``name`` (its key in the report), ``label`` (its row in the table),
    :meth:`generate`, and ``max_new_tokens`` when it generates fewer tokens per prompt than the others (the floor)."""

    name: str
    label: str
    max_new_tokens: int | None = None

    def __init__(self, name: str, label: str, setup: DecodeSetup) -> None:
        self.name, self.label, self.setup = name, label, setup

    def generate(self, prompt: list[int], generator: torch.Generator | None, max_new_tokens: int) -> Generation:
        raise NotImplementedError


class Autoregressive(Method):
    """The baseline every speedup is measured against: one adapter-off forward per token, on dflash-ds's engine."""

    def generate(self, prompt, generator, max_new_tokens):
        s = self.setup
        r = autoregressive_generate(s.model, prompt, max_new_tokens=max_new_tokens, eos_token_ids=s.eos,
                                    temperature=s.config.temperature, generator=generator, static=s.static,
                                    lockstep=s.lockstep)
        return Generation(r.output_ids, r.wall_time, r, r.verify_forwards)


class TwoForwardLoop(Method):
    """dflash-ds's draft-then-verify loop with a drafter (the adapter, the untrained floor, n-gram lookup)."""

    def __init__(self, name: str, label: str, setup: DecodeSetup, make_drafter: Callable[[], Any]) -> None:
        super().__init__(name, label, setup)
        self.make_drafter = make_drafter

    def generate(self, prompt, generator, max_new_tokens):
        s = self.setup
        r = speculative_generate(s.model, prompt, self.make_drafter(), block_size=s.config.block_size,
                                 max_new_tokens=max_new_tokens, eos_token_ids=s.eos, temperature=s.config.temperature,
                                 generator=generator, static=s.static, lockstep=s.lockstep)
        return Generation(r.output_ids, r.wall_time, r, r.verify_forwards + r.draft_forwards)


class FusedLoop(Method):
    """The adapter through the fused loop (one forward per step)."""

    def generate(self, prompt, generator, max_new_tokens):
        s = self.setup
        r = fused_generate(s.model, prompt, s.meta.mask_token_id, block_size=s.config.block_size,
                           max_new_tokens=max_new_tokens, eos_token_ids=s.eos, temperature=s.config.temperature,
                           generator=generator, config=s.config.fused, static=s.static, lockstep=s.lockstep)
        return Generation(r.output_ids, r.wall_time, r, r.verify_forwards + r.draft_forwards)


class HFGenerate(Method):
    """transformers' own greedy ``generate``, optionally with its prompt lookup (``prompt_lookup`` tokens)."""

    def __init__(self, name: str, label: str, setup: DecodeSetup, prompt_lookup: int | None) -> None:
        super().__init__(name, label, setup)
        self.prompt_lookup = prompt_lookup

    def generate(self, prompt, generator, max_new_tokens):
        model, s = self.setup.model, self.setup
        count = [0]
        hook = model.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        ids = torch.tensor([prompt], dtype=torch.long, device=next(model.parameters()).device)
        kwargs: dict[str, Any] = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=s.eos or None, pad_token_id=s.pad)
        if self.prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup
        try:
            with torch.no_grad(), adapter_disabled(model):
                t0 = time.perf_counter()
                out = model.generate(ids, **kwargs)
                seconds = time.perf_counter() - t0
        finally:
            hook.remove()
        new = out[0, len(prompt) :].tolist()
        for i, tok in enumerate(new):
            if tok in s.eos:
                new = new[: i + 1]
                break
        return Generation(new, seconds, {"forwards": count[0], "tokens": len(new)}, count[0])


def build_methods(setup: DecodeSetup) -> list[Method]:
    """The decoders of one evaluation, the autoregressive baseline first (speedups are measured against it)."""
    cfg, meta = setup.config, setup.meta
    greedy = cfg.temperature == 0

    def drafter_loop(loop: str, name: str) -> Method:
        label = f"drafter ({LOOP_LABELS[loop]})"
        if loop == "fused":
            return FusedLoop(name, label, setup)
        return TwoForwardLoop(name, label, setup, lambda: LoRABlockDrafter(meta.mask_token_id, meta.scope))

    first = cfg.loop if cfg.loop != "both" else default_loop(next(setup.model.parameters()).device)
    methods = [Autoregressive(AR, "autoregressive (our engine)", setup), drafter_loop(first, DRAFTER)]
    if cfg.loop == "both":
        methods.append(drafter_loop("two_forward" if first == "fused" else "fused", DRAFTER_OTHER_LOOP))
    if setup.lockstep is not None and greedy and cfg.baselines != "none":
        raise ValueError("an eval on every rank in lockstep (torch.distributed initialised, no shard) runs "
                         "dflash-ds's loops only: transformers' generate cannot follow rank 0's tokens, and a rank "
                         "that picked another token would wait on the others until the timeout; use "
                         "baselines='none', or shard the prompts (shard=(rank, world))")
    if cfg.baselines in ("fast", "all"):
        if greedy:
            methods.append(HFGenerate(PROMPT_LOOKUP, "prompt lookup (transformers)", setup, cfg.prompt_lookup_tokens))
        floor_tokens = min(cfg.floor_tokens or cfg.max_new_tokens, cfg.max_new_tokens)
        shorter = f", first {floor_tokens}" if floor_tokens < cfg.max_new_tokens else ""
        floor = TwoForwardLoop(FLOOR, f"untrained adapter (floor{shorter})", setup,
                               lambda: untrained_floor_drafter(meta.mask_token_id))
        floor.max_new_tokens = floor_tokens
        methods.append(floor)
    if cfg.baselines == "all":
        methods.append(TwoForwardLoop(NGRAM, "n-gram lookup (our loop)", setup, NgramDrafter))
        if greedy:
            methods.append(HFGenerate(HF_GREEDY, "greedy (transformers)", setup, None))
    return methods


class _Runs:
    """One method's generations (first repeat, up to ``max_new_tokens`` per prompt) and its timing over all
    repeats."""

    def __init__(self, label: str, max_new_tokens: int) -> None:
        self.label, self.max_new_tokens = label, max_new_tokens
        self.results: list[Any] = []  # SpecResult, or dicts for transformers' generate
        self.outputs: list[list[int]] = []
        self.tokens = [0]  # per repeat
        self.times = [0.0]

    def new_repeat(self) -> None:
        self.tokens.append(0)
        self.times.append(0.0)

    def add(self, repeat: int, g: Generation) -> None:
        self.tokens[-1] += len(g.ids)
        self.times[-1] += g.seconds
        if repeat == 0:
            self.outputs.append(g.ids)
            self.results.append(g.result)

    @property
    def tokens_per_s(self) -> float:
        t = sum(self.times)
        return sum(self.tokens) / t if t > 0 else 0.0

    def rates(self) -> list[float]:
        return [n / t if t > 0 else 0.0 for n, t in zip(self.tokens, self.times)]

    @classmethod
    def interleave(cls, shards: list["_Runs"]) -> "_Runs":
        """One method's runs from the ranks of a sharded eval, rank ``r`` having decoded prompts ``r, r + W, ...``:
        generations back in prompt order; tokens and seconds added up per repeat, so tokens/s stays the rate of
        one decoding stream."""
        first = shards[0]
        merged = cls(first.label, first.max_new_tokens)
        merged.tokens = [sum(s.tokens[k] for s in shards) for k in range(len(first.tokens))]
        merged.times = [sum(s.times[k] for s in shards) for k in range(len(first.times))]
        for i in range(sum(len(s.outputs) for s in shards)):
            shard = shards[i % len(shards)]
            merged.outputs.append(shard.outputs[i // len(shards)])
            merged.results.append(shard.results[i // len(shards)])
        return merged


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


def run_eval(
    model: nn.Module,
    tokenizer,
    meta,
    prompts: Sequence[list[dict] | str | Sequence[int]],
    config: EvalConfig | None = None,
    *,
    eos_token_ids: Sequence[int] | None = None,
    progress: bool = True,
    warmup: bool = True,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any] | None:
    """Evaluate the adapter on ``model`` (fitted with :func:`dflash_ds.lora.apply_lora` / ``load_adapter_dir``).

    ``meta`` is the adapter's :class:`dflash_ds.lora.DraftMeta` (block size, MASK id, scope); ``prompts`` are
    conversations (last turn user), pre-formatted strings or token-id lists; ``config`` the decoding settings
    (:class:`EvalConfig`). Every method runs on every prompt in each of ``config.repeats`` timing rounds,
    interleaved prompt by prompt so drift hits all methods alike; τ and outputs come from the first round (the runs
    are seeded, so every round generates the same tokens). Returns the report dict (:func:`build_report`). The
    model's train/eval mode and adapter switch are restored.

    ``shard = (rank, world)`` with ``world > 1`` (torch.distributed initialised, one process per rank): this process
    decodes prompts ``rank, rank + world, ...`` and rank 0 gathers every rank's generations and timings into the one
    report, as if one process had decoded them all; the other ranks return None. Each method's tokens/s is then the
    rate of one decoding stream while ``world`` streams share the machine.

    ``shard`` None (the trainer's periodic eval): every process decodes every prompt. Where torch.distributed is
    initialised with more than one rank, their forwards may be collective (ZeRO-3 gathers weights, tensor
    parallelism all-reduces), so the ranks decode in lockstep: rank 0 decides every step's drafts, accepted tokens
    and stop (:class:`dflash_ds.speculative.Lockstep`), the others follow, and every rank returns rank 0's outputs
    (an argmax tie cannot send one rank down another path and hang the rest). Free when not distributed. Call it on
    every rank then, or pass ``shard=(0, 1)`` to decode in one process alone. transformers' ``generate`` cannot
    follow rank 0, so a lockstep eval refuses the baselines that use it (``baselines`` must be ``none``).
    """
    cfg = (config or EvalConfig()).resolved(meta)
    hf_model = unwrap_model(model)
    eos = sorted(set(eos_token_ids)) if eos_token_ids is not None else eos_ids_of(tokenizer, hf_model)
    pad = getattr(tokenizer, "pad_token_id", None)
    prompt_ids = [render_prompt(tokenizer, p) for p in prompts]
    if not prompt_ids:
        raise ValueError("no prompts to evaluate")
    lockstep = Lockstep.if_distributed() if shard is None else None
    rank, world = shard or (0, 1)
    if len(prompt_ids) < world:
        raise ValueError(f"{len(prompt_ids)} prompts for {world} eval ranks: every rank needs at least one")
    B = cfg.block_size
    slots = max(map(len, prompt_ids)) + cfg.max_new_tokens + 2 * B * (B + 2)  # the longest decode, any loop
    # a sliding-window model: refused here, before any decoding, if the longest decode can reach the window
    check_decode_length(hf_model.config, slots,
                        f"--max-new-tokens {cfg.max_new_tokens} after the longest prompt with --block-size {B}")
    static = None
    if cfg.compile != "none":
        static = StaticDecoding(hf_model, slots, compile=cfg.compile == "compile", mode=compile_mode(hf_model))
    setup = DecodeSetup(hf_model, cfg, meta, eos, pad if pad is not None else (eos[0] if eos else 0), static,
                        lockstep)
    was_training = hf_model.training
    hf_model.eval()
    try:
        with adapter_preserved(hf_model):
            bar = progress and rank == 0 and (lockstep is None or lockstep.leader)  # one progress bar per eval
            runs = _time_methods(build_methods(setup), prompt_ids[rank::world], cfg, bar, warmup)
    finally:
        hf_model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        shards = [None] * world if rank == 0 else None
        dist.gather_object(runs, shards, dst=0)
        if rank != 0:
            return None
        runs = {name: _Runs.interleave([r[name] for r in shards]) for name in runs}
    report = build_report(runs, prompt_ids, cfg, meta, eos)
    report["config"]["eval_ranks"] = world
    return report


def _time_methods(methods: list[Method], prompt_ids: list[list[int]], cfg: EvalConfig, progress: bool,
                  warmup: bool) -> dict[str, _Runs]:
    """Every method on every prompt in each of ``cfg.repeats`` rounds, interleaved prompt by prompt; sampled
    methods get the same seed per prompt in every round."""
    device = next(methods[0].setup.model.parameters()).device

    def gen_for(i: int) -> torch.Generator | None:
        return None if cfg.temperature == 0 else torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + i)

    if warmup:  # one-time costs (lazy init, mask functions, compiling every shape) stay out of the timings
        n = cfg.max_new_tokens if cfg.compile == "compile" else min(8, cfg.max_new_tokens)
        for m in methods:
            m.generate(prompt_ids[0], gen_for(0), n)
    runs = {m.name: _Runs(m.label, m.max_new_tokens or cfg.max_new_tokens) for m in methods}
    bar = _progress(cfg.repeats * len(prompt_ids), progress)
    for rep in range(cfg.repeats):
        if rep:
            for run in runs.values():
                run.new_repeat()
        for i, prompt in enumerate(prompt_ids):
            for m in methods:
                runs[m.name].add(rep, m.generate(prompt, gen_for(i), runs[m.name].max_new_tokens))
            bar.update(1)
    bar.close()
    return runs


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="dflash-ds eval", unit="prompt", disable=not enabled, file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


def _speedups(run: _Runs, ar: _Runs) -> dict[str, Any]:
    return t_interval([r / a if a > 0 else 0.0 for r, a in zip(run.rates(), ar.rates())])


def _baseline_entry(name: str, run: _Runs, ar: _Runs, cfg: EvalConfig) -> dict[str, Any]:
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


def build_report(runs: dict[str, _Runs], prompt_ids: list[list[int]], cfg: EvalConfig, meta,
                 eos: list[int]) -> dict[str, Any]:
    """The report: the drafter's τ, acceptance and speedup at the top level (with its loop's accounting), one entry
    per baseline, per-prompt outputs, the config, and the table rows :func:`format_table` prints."""
    ar, spec = runs[AR], runs[DRAFTER]
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
    report["baselines"] = {name: _baseline_entry(name, run, ar, cfg) for name, run in runs.items()
                           if name not in (AR, DRAFTER)}
    report["per_prompt"] = [
        {"index": i, "prompt_tokens": len(p), "ar_ids": ar.outputs[i], "spec_ids": spec.outputs[i],
         "match": drafter_match[i], "tau": spec.results[i].tau, "hit_eos": spec.results[i].hit_eos}
        for i, p in enumerate(prompt_ids)
    ]
    report["config"] = {
        "loop": cfg.loop,
        "fused": dataclasses.asdict(cfg.fused) if cfg.loop != "two_forward" else None,
        "compile": cfg.compile,
        "block_size": cfg.block_size,
        "trained_block_size": int(meta.block_size),
        "scope": meta.scope,
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
    ranks = report["config"].get("eval_ranks", 1)
    if ranks > 1:
        extra.append(f"{ranks} processes decoded the prompts side by side ({report['config']['torch_threads']} "
                     "thread(s) each): tok/s is one stream's rate while they share the machine")
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
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first K prompts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed launcher
    add_flags(p, EvalConfig, "decoding.", "Decoding")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``dflash-ds eval``; under a launcher (``torchrun``/``deepspeed``, WORLD_SIZE > 1) the ranks share the prompts
    and rank 0 writes the one report (:func:`run_eval`'s ``shard``)."""
    from .parallel import exit_on_dist_failure

    args = build_parser().parse_args(argv)
    try:
        with exit_on_dist_failure("dflash-ds eval", hint="run it again"):  # another rank died or hangs: exit 3
            return _main(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dflash-ds eval: error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lora import load_adapter_dir, stack_projections

    config = from_args(EvalConfig, args, "decoding.")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.model_path).is_dir():
        raise FileNotFoundError(f"{args.model_path}: model directory not found")
    prompts = read_prompts(args.prompts)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None and world > 1:  # one GPU a rank, as the launcher numbers them
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # synchronisation and CUDA graphs default to the current device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype,
                                                 attn_implementation=args.attn_implementation)
    meta = load_adapter_dir(model, args.adapter)
    if not 0 <= meta.mask_token_id < model.config.vocab_size:
        raise ValueError(f"{args.adapter}: MASK id {meta.mask_token_id} is outside this model's vocabulary "
                         f"({model.config.vocab_size}): an adapter trained on another base model?")
    model.to(device).eval()
    if config.compile != "compile":  # compiled graphs fuse on their own
        stack_projections(model)  # after the move: the stack is then built once, where it computes
    if world > 1:
        import torch.distributed as dist

        if len(prompts) < world:  # before the process group: every rank fails alike, none waits
            raise ValueError(f"{args.prompts}: {len(prompts)} prompts for {world} eval ranks; every rank needs one")
        dist.init_process_group("gloo")  # the gather is of Python objects, CPU-side on any device
    report = run_eval(model, tokenizer, meta, prompts, config, progress=not args.no_progress, shard=(rank, world))
    if world > 1:
        dist.destroy_process_group()
    if report is None:  # another rank's share: rank 0 writes the report
        return 0
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
