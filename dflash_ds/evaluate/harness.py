"""The timing harness: :func:`run_eval` decodes every prompt with every method over the timing rounds (one process,
sharded across ranks, or in lockstep on every rank) and builds the report (:mod:`.report`)."""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from torch import nn

from ..families import check_decode_length
from ..kinds import DRAFTER, EvalDrafter, in_memory_lora, kind_class, kind_of
from ..lora import adapter_preserved
from ..speculative import Lockstep, StaticDecoding, eos_ids_of, unwrap_model
from ..speculative.decoders import DecodeSetup, Method
from .benchmarks import BenchPrompt, greedy_answerer, turn_prompts
from .config import EvalConfig, compile_mode
from .methods import build_methods
from .prompts import render_prompt
from .report import Runs, build_report


def as_drafters(model: nn.Module, given) -> list[EvalDrafter]:
    """``run_eval``'s drafters: a LoRA ``DraftMeta`` (the adapter on ``model``), one :class:`EvalDrafter` or a
    sequence of them; keys ``drafter``, ``drafter_2``, ... in order."""
    if isinstance(given, EvalDrafter):
        drafters = [given]
    elif isinstance(given, (list, tuple)):
        drafters = list(given)
        if not drafters or not all(isinstance(d, EvalDrafter) for d in drafters):
            raise ValueError("run_eval needs a DraftMeta, an EvalDrafter or a non-empty list of EvalDrafters")
    elif kind_of(given) == "lora":
        drafters = [in_memory_lora(model, given)]
    else:
        raise ValueError("a standalone drafter's metadata alone cannot decode: pass standalone_drafter(draft_model)")
    for i, d in enumerate(drafters):
        d.key = DRAFTER if i == 0 else f"{DRAFTER}_{i + 1}"
    return drafters


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
    benchmark: tuple[str, Sequence[BenchPrompt], dict | None] | None = None,
) -> dict[str, Any] | None:
    """Evaluate one or several drafters on the target ``model``, side by side with the baselines.

    ``meta``: the adapter's :class:`dflash_ds.lora.DraftMeta` (block size, MASK id, scope) for the adapter already
    on ``model`` (:func:`dflash_ds.lora.apply_lora` / ``load_adapter_dir``: the trainer's call), or the drafters
    (:class:`~dflash_ds.kinds.EvalDrafter`, a list for several: :func:`dflash_ds.kinds.load_drafters` fits
    directories of any kind to ``model``, :func:`dflash_ds.kinds.standalone_drafter` wraps an in-memory standalone
    drafter). The first drafter is the report's headline (its top-level fields, as with one drafter), every
    drafter has its entry in ``report["drafters"]`` and its rows in the table; the autoregressive baseline runs
    once, on the same model and engine as every row, and every speedup is over it. ``prompts`` are
    conversations (last turn user), pre-formatted strings or token-id lists; ``config`` the decoding settings
    (:class:`EvalConfig`). Every method runs on every prompt in each of ``config.repeats`` timing rounds,
    interleaved prompt by prompt so drift hits all methods alike; τ and outputs come from the first round (the runs
    are seeded, so every round generates the same tokens). Returns the report dict (:func:`build_report`). The
    model's train/eval mode and adapter switch are restored.

    ``benchmark = (name, bench_prompts, source)``: ``prompts`` are ``[p.prompt for p in bench_prompts]``
    (:func:`dflash_ds.evaluate.benchmarks.turn_prompts`); the report gets the per-category ``benchmark`` section and every
    ``per_prompt`` entry its question id, category and turn.

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
    hf_model = unwrap_model(model)
    drafters = as_drafters(hf_model, meta)
    configs = [(config or EvalConfig()).resolved(d.meta, d.name) for d in drafters]
    cfg = configs[0]  # the headline drafter's: the baselines' block size and prompt lookup's K
    eos = sorted(set(eos_token_ids)) if eos_token_ids is not None else eos_ids_of(tokenizer, hf_model)
    pad = getattr(tokenizer, "pad_token_id", None)
    prompt_ids = [render_prompt(tokenizer, p) for p in prompts]
    if not prompt_ids:
        raise ValueError("no prompts to evaluate")
    if benchmark is not None and len(benchmark[1]) != len(prompt_ids):
        raise ValueError(f"{len(benchmark[1])} benchmark prompts for {len(prompt_ids)} prompts: pass "
                         "[p.prompt for p in bench_prompts] as the prompts")
    lockstep = Lockstep.if_distributed() if shard is None else None
    rank, world = shard or (0, 1)
    if len(prompt_ids) < world:
        raise ValueError(f"{len(prompt_ids)} prompts for {world} eval ranks: every rank needs at least one")
    B = max(c.block_size for c in configs)
    slots = max(map(len, prompt_ids)) + cfg.max_new_tokens + 2 * B * (B + 2)  # the longest decode, any loop
    # a sliding-window model: refused here, before any decoding, if the longest decode can reach the window
    check_decode_length(hf_model.config, slots,
                        f"--max-new-tokens {cfg.max_new_tokens} after the longest prompt with --block-size {B}")
    for d in drafters:  # before any (compiled) forward: e.g. the standalone kind's feature tap, traced once
        kind_class(d.kind).prepare_target(hf_model, d.meta)
    static = None
    if cfg.compile != "none":
        static = StaticDecoding(hf_model, slots, compile=cfg.compile == "compile", mode=compile_mode(hf_model))
    setup = DecodeSetup(hf_model, cfg, drafters[0].meta, eos, pad if pad is not None else (eos[0] if eos else 0),
                        static, lockstep)
    was_training = hf_model.training
    hf_model.eval()
    try:
        with adapter_preserved(hf_model):
            bar = progress and rank == 0 and (lockstep is None or lockstep.leader)  # one progress bar per eval
            mine = list(range(rank, len(prompt_ids), world))
            methods = build_methods(setup, drafters, configs)
            runs = _time_methods(methods, [prompt_ids[i] for i in mine], mine, cfg, bar, warmup)
    finally:
        drafters[0].activate()  # several LoRA adapters on one model: the first one's factors back in
        hf_model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        shards = [None] * world if rank == 0 else None
        dist.gather_object(runs, shards, dst=0)
        if rank != 0:
            return None
        runs = {name: Runs.interleave([r[name] for r in shards]) for name in runs}
    report = build_report(runs, prompt_ids, cfg, drafters, eos, benchmark=benchmark, configs=configs)
    report["config"]["eval_ranks"] = world
    report["config"]["torch_threads"] = torch.get_num_threads()
    return report


def _time_methods(methods: list[Method], prompt_ids: list[list[int]], indices: list[int], cfg: EvalConfig,
                  progress: bool, warmup: bool) -> dict[str, Runs]:
    """Every method on every prompt in each of ``cfg.repeats`` rounds, interleaved prompt by prompt; sampled
    methods get the same seed per prompt in every round, from the prompt's index in the whole eval
    (``indices``), so a sharded eval samples what one process would."""
    device = next(methods[0].setup.model.parameters()).device

    def gen_for(i: int) -> torch.Generator | None:
        return None if cfg.temperature == 0 else torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + i)

    if warmup:  # one-time costs (lazy init, mask functions, compiling every shape) stay out of the timings
        n = cfg.max_new_tokens if cfg.compile == "compile" else min(8, cfg.max_new_tokens)
        for m in methods:
            m.activate()
            m.generate(prompt_ids[0], gen_for(indices[0]), n)
    runs = {m.name: Runs(m.label, m.max_new_tokens or cfg.max_new_tokens) for m in methods}
    bar = progress_bar(cfg.repeats * len(prompt_ids), progress)
    for rep in range(cfg.repeats):
        if rep:
            for run in runs.values():
                run.new_repeat()
        for i, prompt in zip(indices, prompt_ids):
            for m in methods:
                m.activate()  # a LoRA adapter's factors into the shared model: outside the timing
                runs[m.name].add(rep, m.generate(prompt, gen_for(i), runs[m.name].max_new_tokens))
            bar.update(1)
    bar.close()
    return runs


def progress_bar(total: int, enabled: bool, desc: str = "dflash-ds eval", unit: str = "prompt"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr)


def benchmark_prompts(questions: Sequence, model: nn.Module, tokenizer, max_new_tokens: int, *,
                      max_turns: int | None = None, shard: tuple[int, int] = (0, 1),
                      progress: bool = True) -> list[BenchPrompt]:
    """One prompt per turn of every question (:func:`dflash_ds.evaluate.benchmarks.turn_prompts`), the later turns following
    the target's own greedy answers (:func:`dflash_ds.evaluate.benchmarks.greedy_answerer`: what the eval's autoregressive
    baseline generates with the same ``max_new_tokens``) to the earlier ones.

    ``shard = (rank, world)`` with ``world > 1`` (torch.distributed initialised): each rank answers the questions
    ``rank, rank + world, ...`` and every rank gets every prompt, in question order."""
    rank, world = shard
    mine = list(questions[rank::world])
    answer, bar = None, None
    if any(len(q.turns[:max_turns]) > 1 for q in questions):
        bar = progress_bar(sum(len(q.turns[:max_turns]) - 1 for q in mine), progress and rank == 0,
                           desc="dflash-ds eval: answering earlier turns", unit="answer")
        greedy = greedy_answerer(model, tokenizer, max_new_tokens)

        def answer(messages: list[dict]) -> str:
            text = greedy(messages)
            bar.update(1)
            return text

    try:
        prompts = turn_prompts(mine, answer, max_turns=max_turns)
    finally:
        if bar is not None:
            bar.close()
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, prompts)
        by_question: dict[str, list[BenchPrompt]] = {}
        for p in (p for part in gathered for p in part):
            by_question.setdefault(p.question_id, []).append(p)
        prompts = [p for q in questions for p in by_question[q.id]]
    return prompts
