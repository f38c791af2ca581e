"""``dflash-ds demo``: the whole mission on a laptop CPU, in minutes.

1. the tiny Qwen3 target trained on the standard library's source (built once and cached);
2. self-distillation data: the target's own greedy answers to training prompts (SPEC 11: this decides tau);
3. a drafter adapter trained with DeepSpeed ZeRO-3 on 2 CPU ranks, through the ``deepspeed`` launcher exactly as
   on a cluster;
4. lossless speculative decoding on held-out modules' prompts: tau, acceptance by position, AR vs speculative
   tokens/s, next to prompt lookup and the untrained-adapter floor.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zero3_config(workdir: Path) -> Path:
    """The repo's ZeRO-3 JSON when the package runs from a checkout, else the same settings written out."""
    repo = REPO_CONFIGS / "zero3.json"
    if repo.exists():
        return repo
    from .config import DEFAULT_DS_CONFIG

    cfg = json.loads(json.dumps(DEFAULT_DS_CONFIG))
    cfg["zero_optimization"] = {"stage": 3, "overlap_comm": False, "stage3_param_persistence_threshold": 0}
    path = workdir / "zero3.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def prepare_data(target: Path, workdir: Path, num_train: int, max_new_tokens: int) -> Path:
    """Regenerate ``num_train`` training conversations with the target. Cached next to the target when that
    directory is writable (the tiny target's cache), so later demos skip this step; else in the workdir."""
    from .regenerate import regenerate_file

    name = f"train_selfdistill_{num_train}_{max_new_tokens}.jsonl"
    cache = target / "data"
    out = (cache if os.access(cache, os.W_OK) else workdir / "data") / name
    if out.exists():
        print(f"self-distillation data (cached): {out}", flush=True)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = regenerate_file(str(target), str(target / "data" / "train.jsonl"), str(out),
                            max_new_tokens=max_new_tokens, batch_size=32, limit=num_train)
    print(f"self-distillation: {stats.summary()} -> {out}", flush=True)
    return out


def launch_training(target: Path, data: Path, run_dir: Path, args) -> None:
    """Two CPU ranks through the DeepSpeed launcher (the same command a cluster run uses, minus --hostfile)."""
    cmd = [
        "deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "dflash_ds.train",
        "--deepspeed_config", str(_zero3_config(run_dir.parent)),
        "--model-path", str(target), "--train-data", str(data), "--output-dir", str(run_dir),
        "--block-size", str(args.block_size), "--max-length", str(args.max_length),
        "--micro-batch-size", str(args.micro_batch_size), "--max-steps", str(args.steps),
        "--lr", str(args.lr), "--warmup-ratio", "0.05", "--seed", str(args.seed),
        "--save-interval", str(max(args.steps // 2, 1)), "--log-interval", "1",
    ]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")  # two ranks share the cores; oversubscription slows both
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def evaluate(target: Path, adapter: Path, prompts: Path, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import format_table, load_prompts, run_eval
    from .lora import load_adapter_dir

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    meta = load_adapter_dir(model, adapter)
    prompt_ids = load_prompts(prompts, tokenizer, limit=args.eval_prompts)
    report = run_eval(model, tokenizer, meta, prompt_ids, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                      baselines="fast")
    print(format_table(report), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflash-ds demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="demo_work")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of drafter training")
    p.add_argument("--num-train", type=int, default=512, help="training prompts to self-distil")
    p.add_argument("--distill-tokens", type=int, default=64, help="max tokens per regenerated answer")
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default=None, help="use this target directory instead of the cached tiny target")
    args = p.parse_args(argv)

    from .tiny import ensure_tiny_target

    t0 = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    target = Path(args.target).resolve() if args.target else ensure_tiny_target()
    print(f"[1/4] target: {target}", flush=True)
    data = prepare_data(target, workdir, args.num_train, args.distill_tokens)
    print(f"[2/4] training data: {data}", flush=True)
    run_dir = workdir / "run"
    launch_training(target, data, run_dir, args)
    print(f"[3/4] adapter: {run_dir / 'adapter'}  (TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'})",
          flush=True)
    print("[4/4] speculative decoding on held-out modules' prompts", flush=True)
    report = evaluate(target, run_dir / "adapter", target / "data" / "eval_prompts.jsonl", args)
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    summary = {
        "first_loss": train_losses[0],
        "last_loss": train_losses[-1],
        "tau": report["tau"],
        "speedup": report["speedup"],
        "greedy_match": report["greedy_match"],
        "floor_tau": (report.get("baselines", {}).get("untrained_floor") or {}).get("tau"),
        "wall_s": time.perf_counter() - t0,
        "report": report,
    }
    (workdir / "demo_report.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\ntraining loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; "
          f"demo took {summary['wall_s'] / 60:.1f} min; report: {workdir / 'demo_report.json'}", flush=True)
    return 0 if report["greedy_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
