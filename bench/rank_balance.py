#!/usr/bin/env python
"""Two training ranks on sequences of uneven length: shuffled pairs against batches grouped by length.

A synchronous data-parallel step lasts as long as its slowest rank: with one sequence per rank and answers of
79-512 tokens, the rank that drew the shorter one idles at the loss's finiteness check and the gradient all-reduce.
``--group-by-length N`` sorts each run of N global batches by length so the ranks of a step get neighbours. This
runs the real trainer (``torchrun``, 2 ranks, gloo, one thread each, ``ds_configs/zero2.json``) for ``--steps``
steps once per ``--groups`` value, on the same data and seed, one after the other, and reports per case: wall time
of the launch, seconds per step in ``train_step``, and per rank the seconds in DeepSpeed's forward, backward and step
and in all-reduce calls (``bench/_rank_timer.py``). With ``--steps`` a multiple of N the cases train on exactly the
same sequences, only paired differently. Ratios are against the first case.

    python bench/rank_balance.py --train-data smollm2_work/data/train_selfdistill_v2_512_128.jsonl \
        --steps 64 --groups 32,0 --out bench/results/rank_balance_smollm2.json

Defaults: the cached SmolLM2 (``dflash-ds real-target``) and the SmolLM2 recipe's training flags.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as M  # noqa: E402

M.ensure_repo_on_path()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(args, model_path: str, group: int, workdir: Path) -> dict:
    out, times = workdir / f"group{group}", workdir / f"times{group}"
    times.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(M.REPO_ROOT / "bench" / "_rank_timer.py"), "--deepspeed_config",
           str(M.REPO_ROOT / "ds_configs" / "zero2.json"), "--model-path", model_path, "--train-data", args.train_data,
           "--output-dir", str(out), "--block-size", str(args.block_size), "--gamma", "4.0",
           "--max-length", str(args.max_length),
           "--micro-batch-size", "1", "--max-steps", str(args.steps), "--lr", "3e-3", "--warmup-ratio", "0.05",
           "--seed", "0", "--group-by-length", str(group)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(M.REPO_ROOT),
           "RANK_TIMES_DIR": str(times)}
    print(f"group-by-length {group}: {args.steps} steps ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    ranks = [json.loads((times / f"rank{r}.json").read_text()) for r in range(2)]
    step_s = max(r["seconds"]["train_step"] for r in ranks) / args.steps
    case = {"group_by_length": group, "wall_s": wall, "train_step_s_per_step": step_s,
            "per_rank": [{k: v / args.steps for k, v in r["seconds"].items()} for r in ranks]}
    print(f"  {step_s:.2f} s a step; per rank forward "
          + ", ".join(f"{r['forward']:.2f}" for r in case["per_rank"]) + " s, all-reduce "
          + ", ".join(f"{r.get('all_reduce', 0):.2f}" for r in case["per_rank"]) + " s", flush=True)
    return case


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=None, help="default: the cached SmolLM2 of dflash-ds real-target")
    p.add_argument("--train-data", required=True, help="the recipe's regenerated JSONL")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--groups", default="32,0", help="--group-by-length values, comma-separated (0: shuffled)")
    p.add_argument("--out", default="bench/results/rank_balance.json")
    args = p.parse_args(argv)
    model_path = args.model_path
    if model_path is None:
        from dflash_ds.recipes.real_target import ensure_real_target

        model_path = str(ensure_real_target())
    groups = [int(g) for g in args.groups.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        cases = [run_case(args, model_path, g, Path(tmp)) for g in groups]
    first = cases[0]["train_step_s_per_step"]
    for c in cases:
        c["speed_vs_first"] = first / c["train_step_s_per_step"]
    report = {"benchmark": "rank_balance", "date": M.utc_now().isoformat(), "machine": M.machine_info(),
              "command": M.command_line(__file__, argv), "steps": args.steps, "cases": cases}
    print(M.write_json(args.out, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
