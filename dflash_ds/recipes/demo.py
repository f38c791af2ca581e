"""``dflash-ds demo``: the whole mission on a laptop CPU, in minutes.

1. the target: the tiny Qwen3 trained on the standard library's source (``--target tiny``, default; built once and
   cached), or SmolLM2-135M-Instruct (``--target smollm2``: ``dflash-ds real-target``'s cached conversion), or a
   directory;
2. self-distillation data: the target's own greedy answers to training prompts (what decides tau: training on human-written answers instead gives a fraction of it);
3. the drafters (``--drafters``: the LoRA self-drafter, ``WORKDIR/run/adapter``, and for the tiny target also the
   standalone DFlash drafter, ``WORKDIR/run_dflash/drafter``), each trained on the same data with DeepSpeed on 2 CPU
   ranks (ZeRO-3 for the tiny target; ZeRO-2 for SmolLM2, whose 540 MB base ZeRO-3 would gather on every forward:
   docs/benchmarks.md), through the ``deepspeed`` launcher exactly as on a cluster;
4. lossless speculative decoding on held-out prompts (tiny: held-out stdlib modules; smollm2: another code base,
   the source of tqdm and datasets.utils), every drafter side by side in one ``dflash-ds eval`` run: tau,
   acceptance by position, AR vs speculative tokens/s, next to prompt lookup and the untrained-adapter floor, as a
   table and as PNG plots in ``WORKDIR/plots`` (:mod:`dflash_ds.plots`; ``--no-plots`` to skip them; without
   matplotlib the demo says how to install it and goes on without plots).

Every stage leaves its result in ``--workdir`` and is skipped when it is there, so running the same command again
after an interruption resumes (regeneration answer by answer, training from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import DEFAULT_DS_CONFIG
from ..evaluate import LOOP_CHOICES, cli
from ..kinds import KINDS, DFlashConfig, kind_class
from .. import plots
from ..regenerate import regenerate_file
from .corpus import EVAL_CODE_BASES, write_function_prompts
from .launcher import LauncherNotFound, deepspeed_launcher, launch_command, rank_env
from .real_target import ensure_real_target
from .tiny_target import ensure_tiny_target

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


@dataclass(frozen=True)
class Recipe:
    """The defaults of one demo target (each is also a flag)."""

    zero_stage: int
    steps: int  # optimizer steps of drafter training
    num_train: int  # training prompts to self-distil
    distill_tokens: int  # max tokens per regenerated answer
    block_size: int
    gamma: float  # loss decay over block positions
    max_length: int
    micro_batch_size: int
    lr: float
    eval_prompts: int
    max_new_tokens: int
    repeats: int
    regen_ranks: int  # processes regenerating in parallel (1 thread each when > 1)
    regen_batch: int
    truncated: str  # what training does with answers cut off at distill_tokens
    num_anchors: int | None = None  # blocks per sample (None: its length // block_size)
    loop: str = "auto"  # eval's --loop
    floor_tokens: int | None = None  # eval's --floor-tokens
    group_by_length: int = 0  # training's --group-by-length
    eval_ranks: int = 1  # processes sharing the eval's prompts (1 thread each when > 1)
    drafters: str = "lora"  # the drafter kinds to train and compare, comma-separated (dflash_ds.kinds)
    draft_layers: int = 1  # the standalone drafter's layers
    dflash_steps: int = 0  # the standalone drafter's optimizer steps (0: --steps)
    dflash_lr: float = 0.0  # the standalone drafter's learning rate (0: --lr)
    dflash_features: bool = True  # the standalone drafter trains from offline target features (dflash-ds features)
    draft_vocab: int = 0  # the standalone drafter's draft vocabulary (0: the target's whole vocabulary)
    draft_init: str = "target"  # the standalone drafter's initialisation (--draft-init)


RECIPES = {
    # 1.8M parameters: per-forward overhead dominates, so one process with batch 32 regenerates fastest.
    # dflash_steps: a standalone drafter step costs about 0.4x a LoRA step here (no backward through the target),
    # so both kinds train for about the same time (README "The demo")
    "tiny": Recipe(zero_stage=3, steps=200, num_train=512, distill_tokens=64, block_size=8, gamma=7.0,
                   max_length=256, micro_batch_size=4, lr=3e-3, eval_prompts=16, max_new_tokens=96, repeats=3,
                   regen_ranks=1, regen_batch=32, truncated="keep", drafters="lora,dflash", dflash_steps=500),
    # 134.5M parameters, compute-bound on 2 cores (AR step ~55 ms): two ranks of one thread each, ZeRO-2.
    # 900 steps and gamma 4 (the DFlash paper's decay for B = 8): measured against 300 and 600 steps and gamma 7 in the
    # README (grouped by length, 600 steps fell to 1.21x prompt lookup; 900 still fit the hour).
    # Regeneration: continuous batches of 32 (1.2x batches of 16). Training: answers run 79-512 tokens, so shuffled
    # pairs leave one rank idle at each step's all-reduce; grouped by length, a step's two ranks get neighbours.
    # Eval: no fused row, the floor on 32 tokens a prompt, and two processes of one thread each sharing the prompts
    # (a one-token forward is hardly faster on two threads than on one). docs/benchmarks.md, README "A real model".
    # dflash_lr: the standalone drafter trains full layers, not a low-rank adapter; over steps 51-150 its mean loss
    # was 0.6 higher at 3e-3 than at 6e-4 (the DFlash reference's order), one run each (docs/recipes.md, 2026-12-05)
    # From random init, 2e-3 ended at tau 1.34 against 6e-4's 1.39; neither 8 sequences a step (--grad-accum 4) nor
    # 4 draft layers beat the recipe by more than 0.02 tau at their cost (docs/recipes.md, eval 4, 2026-12-07)
    # draft_vocab: 8,192 answer tokens (95% of held-out answer tokens), its head frozen: in one side-by-side eval the
    # decoding step fell from 2.26 to 1.87 AR steps, speedup 0.56x -> 0.66x, tau 1.26 -> 1.23; 4,096 tokens decoded
    # as fast, a trained head gained tau 0.03 for 27% more training time (docs/benchmarks.md, 2026-12-07).
    # draft_init: random (the peers' init) beat the copy of the target's last layers in two evals, tau 1.31 against
    # 1.23 (600 steps, 64 blocks a sequence) and 1.39 against 1.32 (1,100 steps) (docs/recipes.md, 2026-12-07)
    "smollm2": Recipe(zero_stage=2, steps=900, num_train=512, distill_tokens=128, block_size=8, gamma=4.0,
                      max_length=512, micro_batch_size=1, lr=3e-3, eval_prompts=16, max_new_tokens=128, repeats=1,
                      regen_ranks=2, regen_batch=32, truncated="keep", loop="two_forward",
                      floor_tokens=32, group_by_length=32, eval_ranks=2, dflash_lr=6e-4, draft_layers=2,
                      draft_vocab=8192, draft_init="random"),
}


def _ds_config(stage: int, workdir: Path) -> Path:
    """The repo's zero{stage}.json when the package runs from a checkout, else the same settings written out."""
    repo = REPO_CONFIGS / f"zero{stage}.json"
    if repo.exists():
        return repo
    cfg = json.loads(json.dumps(DEFAULT_DS_CONFIG))
    cfg["zero_optimization"] = {"stage": stage, "overlap_comm": False}
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = workdir / f"zero{stage}.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def prepare_data(target: Path, prompts: Path, workdir: Path, args) -> Path:
    """Regenerate ``args.num_train`` training conversations with the target (``args.regen_ranks`` processes).
    Cached next to the prompts when that directory is writable (the tiny target's cache), so later demos skip
    this step; else in the workdir. An interrupted run resumes where it stopped."""
    # v2: records carry "truncated" (a cache from before would silently train on cut-off answers' end-of-turn)
    name = f"train_selfdistill_v2_{args.num_train}_{args.distill_tokens}.jsonl"
    out = (prompts.parent if os.access(prompts.parent, os.W_OK) else workdir / "data") / name
    if out.exists():
        print(f"self-distillation data (cached): {out}", flush=True)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    common = ["--model-path", str(target), "--in", str(prompts), "--out", str(out), "--limit", str(args.num_train),
              "--max-new-tokens", str(args.distill_tokens), "--batch-size", str(args.regen_batch)]
    if args.regen_ranks > 1:
        cmd = launch_command(args.regen_ranks, "dflash_ds.regenerate", common)
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, env=rank_env(), check=True)
    else:
        stats = regenerate_file(str(target), str(prompts), str(out), max_new_tokens=args.distill_tokens,
                                batch_size=args.regen_batch, limit=args.num_train)
        print(f"self-distillation: {stats.summary()} -> {out}", flush=True)
    return out


def run_dir(workdir: Path, kind: str) -> Path:
    """Where a drafter kind trains: ``WORKDIR/run`` (LoRA, as before there were two kinds), ``WORKDIR/run_<kind>``."""
    return workdir / ("run" if kind == "lora" else f"run_{kind}")


def artifact(workdir: Path, kind: str) -> Path:
    """The exported drafter of a kind: ``run/adapter`` (LoRA) or ``run_dflash/drafter``."""
    return run_dir(workdir, kind) / kind_class(kind).artifact_dir


def train_drafter(target: Path, data: Path, workdir: Path, kind: str, args) -> float | None:
    """Train a drafter kind unless its artifact is there; the training's wall time in seconds (launch included), or
    None when it was found."""
    out = artifact(workdir, kind)
    if out.is_dir():
        print(f"trained {kind} drafter found in {out}: training skipped (delete it to retrain)", flush=True)
        return None
    t0 = time.perf_counter()
    launch_training(target, data, run_dir(workdir, kind), kind, args)
    return time.perf_counter() - t0


def launch_training(target: Path, data: Path, out: Path, kind: str, args) -> None:
    """Two CPU ranks through the DeepSpeed launcher (the same command a cluster run uses, minus --hostfile).
    ``--resume auto``: a rerun continues from the last checkpoint. The standalone kind first writes the target's
    features once (``dflash-ds features`` with the training flags, resumable) and trains from them
    (``--features``), unless ``--no-dflash-features``."""
    steps = args.dflash_steps if kind == "dflash" and args.dflash_steps else args.steps
    lr = args.dflash_lr if kind == "dflash" and args.dflash_lr else args.lr
    flags = [
        "--drafter", kind, "--deepspeed_config", str(_ds_config(args.zero_stage, out.parent)),
        "--model-path", str(target), "--train-data", str(data), "--output-dir", str(out),
        "--block-size", str(args.block_size), "--gamma", str(args.gamma), "--max-length", str(args.max_length),
        "--micro-batch-size", str(args.micro_batch_size), "--max-steps", str(steps),
        "--group-by-length", str(args.group_by_length),
        "--lr", str(lr), "--warmup-ratio", "0.05", "--seed", str(args.seed), "--truncated", args.truncated,
        "--save-interval", str(max(steps // 4, 1)), "--log-interval", "1", "--resume", "auto",
    ]
    if args.num_anchors:
        flags += ["--num-anchors", str(args.num_anchors)]
    if kind == "dflash":
        flags += ["--draft-layers", str(args.draft_layers), "--draft-init", args.draft_init]
        if args.draft_vocab:
            flags += ["--draft-vocab", str(args.draft_vocab)]
        if args.dflash_features:
            flags += ["--features", str(out.parent / f"{out.name}_features")]
            _run(launch_command(2, "dflash_ds.features", flags))
    _run(launch_command(2, "dflash_ds.train", flags))


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, env=rank_env(), check=True)


def evaluate(target: Path, drafters: list[Path], prompts: Path, report_path: Path, args) -> dict:
    """Every drafter side by side in one ``dflash-ds eval`` on the held-out prompts: in this process, or with
    ``args.eval_ranks > 1`` under the launcher, the ranks sharing the prompts. The report is kept at
    ``report_path``."""
    argv = ["--model-path", str(target), "--prompts", str(prompts), "--limit", str(args.eval_prompts),
            "--report", str(report_path), "--max-new-tokens", str(args.max_new_tokens), "--repeats",
            str(args.repeats), "--baselines", "fast", "--loop", args.loop]
    for path in drafters:
        argv += ["--drafter", str(path)]
    if args.floor_tokens:
        argv += ["--floor-tokens", str(args.floor_tokens)]
    if args.eval_ranks > 1:
        cmd = launch_command(args.eval_ranks, "dflash_ds.evaluate", [*argv, "--threads", "1"])
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, env=rank_env(), check=True)
    elif cli.main([*argv, "--threads", str(max(1, os.cpu_count() or 1))]) != 0:
        raise RuntimeError(f"dflash-ds eval {' '.join(argv)} failed")
    return json.loads(report_path.read_text())


def training_summary(run: Path, train_s: float | None) -> dict:
    """A training run's first and last loss and steps (``metrics.jsonl``) and wall time (None: trained by an earlier
    demo)."""
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {"first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "steps": rows[-1].get("step", len(rows)),
            "train_s": train_s}


def plots_available() -> bool:
    """matplotlib is importable; else one line says how to install it (the demo goes on without plots)."""
    try:
        plots.require_matplotlib()
    except ImportError as exc:  # MissingExtra, whose message names the pip command
        print(f"no plots ({exc}); the demo goes on without them", flush=True)
        return False
    return True


def write_demo_plots(report: dict[str, Any], plot_dir: Path) -> list[Path]:
    """The eval report's plots as PNGs in ``plot_dir``; a failure is one line, never the demo's failure."""
    try:
        return plots.write_plots(report, plot_dir)
    except Exception as exc:  # noqa: BLE001 - plots are an extra: the demo's result is the report
        print(f"no plots: {type(exc).__name__}: {exc}", flush=True)
        return []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags; every recipe default (:data:`RECIPES`) is a flag whose default comes from ``--target``."""
    p = argparse.ArgumentParser(prog="dflash-ds demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="demo_work")
    p.add_argument("--target", default="tiny",
                   help="'tiny' (the cached tiny Qwen3), 'smollm2' (SmolLM2-135M-Instruct, see dflash-ds real-target) "
                        "or a target directory with data/train.jsonl and data/eval_prompts.jsonl (tiny defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true",
                   help="do not write the eval's PNG plots (default: WORKDIR/plots, when matplotlib is installed)")
    helps = {"steps": "optimizer steps of drafter training", "num_train": "training prompts to self-distil",
             "distill_tokens": "max tokens per regenerated answer", "zero_stage": "ZeRO stage of drafter training",
             "regen_ranks": "processes regenerating in parallel", "truncated": "drop or keep cut-off answers",
             "gamma": "loss decay exp(-(k-1)/gamma) over block positions",
             "num_anchors": "blocks per training sample (0: its length // block size)",
             "loop": "eval's decoding loop (two_forward, fused, both, auto)",
             "floor_tokens": "tokens per prompt for the untrained-adapter floor (0: all of --max-new-tokens)",
             "group_by_length": "sort each run of N global batches by length (training; 0: shuffled order)",
             "eval_ranks": "processes sharing the eval's prompts, one thread each when > 1",
             "drafters": "drafter kinds to train and compare side by side, comma-separated (lora, dflash)",
             "draft_layers": "the standalone (dflash) drafter's layers",
             "dflash_steps": "the standalone drafter's optimizer steps (0: --steps; tiny: about the LoRA kind's "
                             "training time)",
             "dflash_lr": "the standalone drafter's learning rate (0: --lr)",
             "draft_vocab": "the standalone drafter drafts over the N most frequent answer tokens, its own lm_head "
                            "(0: the target's whole vocabulary)",
             "draft_init": "the standalone drafter's initialisation: target (its last layers copied) or random",
             "dflash_features": "the standalone drafter trains from the target's features, written once by "
                                "dflash-ds features (--no-dflash-features: the target runs every step)"}
    for field, value in asdict(RECIPES["tiny"]).items():
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(value, bool) else {
            "type": int if value is None else type(value)}
        p.add_argument("--" + field.replace("_", "-"), **kind, default=None,
                       help=f"{helps.get(field, '')} (default: the target's recipe, tiny {value}, "
                            f"smollm2 {getattr(RECIPES['smollm2'], field)})")
    args = p.parse_args(argv)
    recipe = RECIPES.get(args.target, RECIPES["tiny"])
    for field, value in asdict(recipe).items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    if args.eval_ranks < 1:
        p.error(f"--eval-ranks must be >= 1, got {args.eval_ranks}")
    kinds = [k.strip() for k in args.drafters.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        p.error(f"--drafters must list drafter kinds from {', '.join(KINDS)} (comma-separated, each once), "
                f"got {args.drafters!r}")
    args.drafters = kinds
    if args.truncated not in ("drop", "keep"):
        p.error(f"--truncated must be drop or keep, got {args.truncated!r}")
    if args.loop not in LOOP_CHOICES:
        p.error(f"--loop must be one of {', '.join(LOOP_CHOICES)}, got {args.loop!r}")
    try:  # up front, not after regeneration
        DFlashConfig(init=args.draft_init)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # up front, not after minutes of target building and self-distillation
        deepspeed_launcher()
    except LauncherNotFound as exc:
        print(f"dflash-ds demo: error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    plot_dir = None if args.no_plots or not plots_available() else workdir / "plots"  # checked before the work
    if args.target == "smollm2":
        target = ensure_real_target()
        train_prompts, eval_prompts = write_function_prompts(workdir, args.num_train, args.eval_prompts)
        held_out = f"prompts from another code base ({', '.join(EVAL_CODE_BASES)})"
    else:
        target = ensure_tiny_target() if args.target == "tiny" else Path(args.target).resolve()
        train_prompts, eval_prompts = target / "data" / "train.jsonl", target / "data" / "eval_prompts.jsonl"
        held_out = "held-out modules' prompts"
    print(f"[1/4] target: {target}", flush=True)
    data = prepare_data(target, train_prompts, workdir, args)
    print(f"[2/4] training data: {data}", flush=True)
    kinds = args.drafters
    train_s = {kind: train_drafter(target, data, workdir, kind, args) for kind in kinds}
    for kind in kinds:
        print(f"[3/4] {kind} drafter: {artifact(workdir, kind)}  "
              f"(TensorBoard: tensorboard --logdir {run_dir(workdir, kind) / 'tensorboard'})", flush=True)
    print(f"[4/4] speculative decoding on {held_out}", flush=True)
    report = evaluate(target, [artifact(workdir, k) for k in kinds], eval_prompts, workdir / "eval_report.json", args)
    plots = write_demo_plots(report, plot_dir) if plot_dir is not None else []
    rows = report["drafters"]  # keys drafter, drafter_2, ... in --drafter order; their other loops beside them
    keys = ["drafter" if i == 0 else f"drafter_{i + 1}" for i in range(len(kinds))]
    summary = {
        "drafters": {kind: {**training_summary(run_dir(workdir, kind), train_s[kind]),
                            **{k: rows[key].get(k) for k in ("label", "tau", "speedup", "greedy_match", "parameters",
                                                             "acceptance_by_position")}}
                     for kind, key in zip(kinds, keys)},
        "tau": report["tau"],
        "speedup": report["speedup"],
        "greedy_match": all(row["greedy_match"] for row in rows.values()),
        "floor_tau": (report.get("baselines", {}).get("untrained_floor") or {}).get("tau"),
        "wall_s": time.perf_counter() - t0,
        "settings": {k: v for k, v in vars(args).items()},
        "plots": [str(p) for p in plots],
        "report": report,
    }
    (workdir / "demo_report.json").write_text(json.dumps(summary, indent=2, default=str))
    print(flush=True)
    for kind, d in summary["drafters"].items():
        took = f", trained in {d['train_s'] / 60:.1f} min" if d["train_s"] is not None else ""
        print(f"{kind}: training loss {d['first_loss']:.3f} -> {d['last_loss']:.3f} in {d['steps']} steps{took}",
              flush=True)
    print(f"demo took {summary['wall_s'] / 60:.1f} min; report: {workdir / 'demo_report.json'}", flush=True)
    for path in plots:
        print(f"plot: {path}", flush=True)
    return 0 if summary["greedy_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
