"""``dflash-ds eval`` (and ``python -m dflash_ds.evaluate``): the command line around :func:`run_eval`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from .benchmarks import BENCHMARKS, MissingExtra
from ..files import write_json_atomic
from ..settings import add_flags, from_args
from .config import EvalConfig
from .harness import benchmark_prompts, run_eval
from .prompts import read_prompts
from .report import format_benchmark, format_table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dflash-ds eval",
        description="Speculative decoding with one or several drafters (dflash-ds LoRA adapters, standalone DFlash "
        "drafters) side by side, against the autoregressive baseline, prompt lookup and the untrained-adapter "
        "floor, on the same model and engine, in one run.",
    )
    p.add_argument("--model-path", required=True, help="the target model directory (from_pretrained)")
    p.add_argument("--drafter", dest="drafters", action="append", type=lambda v: (None, v), default=[],
                   metavar="DIR", help="a drafter directory of either kind: a dflash-ds LoRA adapter (dflash.json) or "
                   "a standalone DFlash drafter (config.json with architectures [\"DFlashDraftModel\"]); repeat it "
                   "for several, each one a row (the first is the report's headline)")
    p.add_argument("--adapter", dest="drafters", action="append", type=lambda v: ("lora", v), metavar="DIR",
                   help="a LoRA adapter directory exported by dflash-ds (dflash.json): --drafter for LoRA adapters "
                   "only; repeatable, in order with --drafter")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompts", help="JSONL conversations, last turn user")
    what.add_argument("--benchmark", metavar="SET",
                      help=f"a standard prompt set read from its installed wheel ({' | '.join(BENCHMARKS)}), or the "
                      "path of an MT-Bench / Spec-Bench question.jsonl (question_id, category, turns); the report "
                      "adds tau, speedup and acceptance per category. A later turn follows the target's own greedy "
                      "answers to the earlier ones")
    p.add_argument("--report", required=True, help="where to write the JSON report")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first K prompts (with --benchmark: the first K questions)")
    p.add_argument("--max-turns", type=int, default=None, metavar="N",
                   help="with --benchmark: only the first N turns of every question (default: all)")
    p.add_argument("--plot", metavar="DIR", default=None,
                   help="also write PNG plots of the report into DIR (acceptance by position, tau and speedup per "
                   "method; needs matplotlib: pip install 'dflash-ds[plots]')")
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
    and rank 0 writes the one report (:func:`run_eval`'s ``shard``). A bad input, or an optional extra that
    ``--benchmark``/``--plot`` needs and is not installed: exit 2 with the reason (and the pip command)."""
    from ..parallel import exit_on_dist_failure

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.drafters:
        parser.error("one of the arguments --drafter --adapter is required")
    try:
        with exit_on_dist_failure("dflash-ds eval", hint="run it again"):  # another rank died or hangs: exit 3
            return _main(args)
    except (FileNotFoundError, ValueError, MissingExtra) as exc:
        print(f"dflash-ds eval: error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..lora import stack_projections
    from ..kinds import load_drafters, open_drafters

    config = from_args(EvalConfig, args, "decoding.")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.max_turns is not None:
        if args.benchmark is None:
            raise ValueError("--max-turns needs --benchmark (a --prompts line is one prompt)")
        if args.max_turns < 1:
            raise ValueError(f"--max-turns must be >= 1, got {args.max_turns}")
    if args.plot is not None:  # before a long eval, not after it
        from ..plots import require_matplotlib

        require_matplotlib()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.model_path).is_dir():
        raise FileNotFoundError(f"{args.model_path}: model directory not found")
    artifacts = open_drafters(args.drafters)  # every drafter's kind and metadata, before any model loads
    if args.benchmark is not None:  # the questions (and a missing wheel) before the model loads
        from .benchmarks import benchmark_source, load_questions

        questions = load_questions(args.benchmark)[: args.limit]
        source = benchmark_source(args.benchmark)
        num_prompts = sum(len(q.turns[: args.max_turns]) for q in questions)
        what = f"--benchmark {args.benchmark}"
    else:
        prompts = read_prompts(args.prompts)[: args.limit]
        num_prompts, what = len(prompts), args.prompts
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
    model.to(device).eval()
    # one model for every row: the LoRA adapters share it (factors swapped in per generation), the standalone
    # drafters load beside it on its device and dtype
    drafters = load_drafters(model, artifacts)
    if config.compile != "compile":  # compiled graphs fuse on their own
        stack_projections(model)  # after the move: the stack is then built once, where it computes
    if world > 1:
        import torch.distributed as dist

        if num_prompts < world:  # before the process group: every rank fails alike, none waits
            raise ValueError(f"{what}: {num_prompts} prompts for {world} eval ranks; every rank needs one")
        dist.init_process_group("gloo")  # the gathers are of Python objects, CPU-side on any device
    benchmark = None
    if args.benchmark is not None:
        bench = benchmark_prompts(questions, model, tokenizer, config.max_new_tokens, max_turns=args.max_turns,
                                  shard=(rank, world), progress=not args.no_progress)
        prompts = [p.prompt for p in bench]
        benchmark = (args.benchmark, bench, source)
    report = run_eval(model, tokenizer, drafters, prompts, config, progress=not args.no_progress, shard=(rank, world),
                      benchmark=benchmark)
    if world > 1:
        dist.destroy_process_group()
    if report is None:  # another rank's share: rank 0 writes the report
        return 0
    report["config"].update(
        model_path=str(args.model_path), drafters=[str(a.path) for a in artifacts],
        adapter=next((str(a.path) for a in artifacts if a.kind == "lora"), None), prompts=args.prompts,
        benchmark=args.benchmark,
        limit=args.limit, max_turns=args.max_turns, device=str(device), dtype=str(dtype).replace("torch.", ""),
        attn_implementation=args.attn_implementation,
    )
    write_json_atomic(args.report, report)
    print(format_table(report))
    if benchmark is not None:
        print()
        print(format_benchmark(report))
    print(f"report written to {args.report}")
    if args.plot is not None:
        from ..plots import write_plots

        for path in write_plots(report, args.plot):
            print(f"plot written to {path}")
    return 0
