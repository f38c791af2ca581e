#!/usr/bin/env python
"""Training-step scaling: tokens/s of the real trainer at 1, 2 and 4 ranks (ZeRO-2, ZeRO-3, TP x2), and the bytes
each layout moves per optimizer step, computed from the adapter and the partitioning.

Every case is a real ``python -m torch.distributed.run --nproc_per_node N -m dflash_ds.train`` run (gloo on the
CPU, ``OMP_NUM_THREADS=1`` per rank) on the tiny target (``dflash-ds tiny-target``, cached) and its training data,
with a fixed micro-batch per data-parallel rank (weak scaling: the global batch grows with the ranks). Figures are
the trainer's own ``metrics.jsonl`` per optimizer step (``tokens_per_s`` counts clean plus block tokens over all
ranks); the first ``--warmup`` steps are dropped and the median of the rest is reported.

Bytes per step (per rank, sent; ring algorithms: an all-reduce of S bytes sends 2(n-1)/n S, a reduce-scatter or an
all-gather (n-1)/n S) are computed, not measured, from the model config and the LoRA shapes:

* ZeRO-1/2 over n data-parallel ranks: gradients of the trainable (adapter) parameters reduce-scattered, updated
  parameters all-gathered: 2 (n-1)/n x P x 4 bytes (fp32 on the CPU) per optimizer step, independent of tokens.
* ZeRO-3: the same, plus every micro-step's forward and backward all-gather the partitioned parameters, the
  frozen base included: 2 (n-1)/n x (base + adapter) bytes per micro-step (``ds_configs/zero3.json`` sets
  ``stage3_param_persistence_threshold`` 0, so every parameter is partitioned and gathered; a higher threshold
  keeps small ones whole and moves less).
* TP x t (Megatron layout, dflash_ds.lora): per layer 2 all-reduces of the activations in the forward (after the
  row-parallel o and down projections) and 2 in the backward (before the column-parallel q/k/v and gate/up):
  4 L x 2 (t-1)/t x tokens x hidden x dtype bytes per micro-step, plus the LoRA rank-r partial sums of the
  row-parallel factors (2 per layer per direction, r instead of hidden wide) and the gradient all-reduce of the
  replicated factors once per optimizer step. Under TP the data-parallel terms use the per-TP-rank shares.

Usage (from the repository root; a few minutes on 2 cores)::

    python bench/scaling.py                                     # ranks 1 2 4, zero2 zero3 tp2, 8 steps
    python bench/scaling.py --ranks 1 2 --layouts zero2 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as M  # noqa: E402

M.ensure_repo_on_path()

LAYOUTS = {  # name -> (ds_config, tensor-parallel size)
    "zero2": ("zero2.json", 1),
    "zero3": ("zero3.json", 1),
    "tp2": ("autotp2_zero1.json", 2),
}
FP32 = 4


# ----------------------------------------------------------------------------------------------- bytes per step


def lora_shapes(config, targets) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-wrapped projection of one decoder layer."""
    h, i = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
              "up_proj": (h, i), "down_proj": (i, h)}
    return {name: shapes[name] for name in targets}


def count_params(config) -> int:
    """Parameters of the base model (built on the meta device: no memory, any size)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def bytes_per_step(config, *, r: int, targets, base_params: int, dp: int, tp: int, zero_stage: int,
                   micro_steps: int, tokens_per_micro: float, dtype_bytes: int = FP32) -> dict[str, float]:
    """Bytes one rank sends per optimizer step (see the module docstring), by term."""
    layers = config.num_hidden_layers
    row = ("o_proj", "down_proj")
    shapes = lora_shapes(config, targets)
    adapter = layers * sum(r * (i + o) for i, o in shapes.values())
    # the replicated factor of each TP-split projection: A (r x in) of a column-parallel one, B (out x r) of a row one
    replicated = layers * sum((o * r) if name in row else (r * i) for name, (i, o) in shapes.items())
    adapter_per_tp_rank = (adapter - replicated) / tp + replicated if tp > 1 else adapter
    base_per_tp_rank = base_params / tp  # the embedding and norms are not split; close enough at these sizes
    ring = (dp - 1) / dp
    out = {
        "adapter_params": adapter,
        "base_params": base_params,
        "dp_grad_reduce_scatter": ring * adapter_per_tp_rank * FP32 if dp > 1 else 0.0,
        "dp_param_all_gather": ring * adapter_per_tp_rank * dtype_bytes if dp > 1 else 0.0,
        "zero3_param_gathers": 0.0,
        "tp_activation_all_reduce": 0.0,
        "tp_lora_partial_sums": 0.0,
        "tp_replicated_grad_all_reduce": 0.0,
    }
    if zero_stage == 3 and dp > 1:
        out["zero3_param_gathers"] = micro_steps * 2 * ring * (base_per_tp_rank + adapter_per_tp_rank) * dtype_bytes
    if tp > 1:
        tring = 2 * (tp - 1) / tp
        h = config.hidden_size
        out["tp_activation_all_reduce"] = micro_steps * 4 * layers * tring * tokens_per_micro * h * dtype_bytes
        n_row = sum(1 for name in shapes if name in row)
        out["tp_lora_partial_sums"] = micro_steps * 2 * n_row * layers * tring * tokens_per_micro * r * dtype_bytes
        out["tp_replicated_grad_all_reduce"] = tring * replicated * FP32
    out["total"] = sum(v for k, v in out.items() if k not in ("adapter_params", "base_params"))
    return out


# -------------------------------------------------------------------------------------------------- one case


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(args, model_path: Path, data: Path, layout: str, ranks: int, workdir: Path) -> dict:
    config_name, tp = LAYOUTS[layout]
    dp = ranks // tp
    accum = args.micro_batches
    out = workdir / f"{layout}_{ranks}"
    train_args = ["--model-path", str(model_path), "--train-data", str(data), "--output-dir", str(out),
                  "--deepspeed_config", str(M.REPO_ROOT / "ds_configs" / config_name), "--block-size",
                  str(args.block_size), "--max-length", str(args.max_length), "--micro-batch-size",
                  str(args.micro_batch_size), "--grad-accum", str(accum), "--max-steps", str(args.steps),
                  "--lora-r", str(args.lora_r), "--seed", "0"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "dflash_ds.train", *train_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(_free_port()), "-m", "dflash_ds.train", *train_args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(M.REPO_ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.case_timeout)
    wall = time.perf_counter() - t0
    case = {"layout": layout, "ds_config": config_name, "ranks": ranks, "tp": tp, "dp": dp,
            "micro_batch_size": args.micro_batch_size, "grad_accum": accum, "wall_s": wall}
    if proc.returncode != 0:
        text = proc.stderr + proc.stdout
        named = [line for line in text.splitlines() if "dflash-ds train: error" in line]
        case.update(status="failed", error="\n".join(named[:2]) or text[-2000:])
        return case
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    timed = steps[args.warmup:] or steps
    tps = [s["tokens_per_s"] for s in timed]
    case.update(status="ok", steps=len(steps), tokens_per_s_median=statistics.median(tps), tokens_per_s=tps,
                loss_first=steps[0]["loss"], loss_last=steps[-1]["loss"])
    return case


def with_kv_heads(model_path: Path, kv_heads: int, out: Path) -> Path:
    """The model's shape with ``kv_heads`` key-value heads, random weights, the same tokenizer: throughput only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_path)
    config.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return out


def tokens_per_micro_step(model_path: Path, data: Path, args) -> float:
    """Mean clean + block tokens of one sequence (S + N*B with N = S // B anchors), times the micro batch."""
    from transformers import AutoTokenizer

    from dflash_ds.data import DataConfig, build_dataset

    tok = AutoTokenizer.from_pretrained(model_path)
    ds = build_dataset(tok, DataConfig(paths=[str(data)], max_length=args.max_length))
    lengths = [len(x) for x in ds["input_ids"][: 512]]
    per_seq = statistics.mean(s + (s // args.block_size) * args.block_size for s in lengths)
    return per_seq * args.micro_batch_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per case")
    p.add_argument("--warmup", type=int, default=3, help="steps dropped before the median")
    p.add_argument("--micro-batch-size", type=int, default=2, help="sequences per data-parallel rank per micro-step")
    p.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--model-path", default=None, help="default: the cached tiny target (dflash-ds tiny-target)")
    p.add_argument("--train-data", default=None, help="default: the tiny target's data/train.jsonl")
    p.add_argument("--case-timeout", type=int, default=900)
    p.add_argument("--workdir", default=None, help="where the runs write (default: a temporary directory)")
    p.add_argument("--out", default=str(M.REPO_ROOT / "bench" / "results" / "scaling.json"))
    args = p.parse_args(argv)

    import tempfile

    from transformers import AutoConfig

    from dflash_ds.lora import DEFAULT_TARGETS

    started = M.utc_now()
    if args.model_path is None:
        from dflash_ds.recipes.tiny_target import ensure_tiny_target

        model_path = ensure_tiny_target()
    else:
        model_path = Path(args.model_path)
    data = Path(args.train_data) if args.train_data else model_path / "data" / "train.jsonl"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dflash_scaling_"))
    config = AutoConfig.from_pretrained(model_path)
    tp_max = max(LAYOUTS[name][1] for name in args.layouts)
    if config.num_key_value_heads < tp_max:  # the tiny target has one KV head: TP x2 cannot split it
        model_path = with_kv_heads(model_path, tp_max, workdir / f"model_kv{tp_max}")
        config = AutoConfig.from_pretrained(model_path)
        print(f"every case runs on {model_path}: the same shape with {tp_max} key-value heads (random weights), "
              "so that TP x2 can split the heads", flush=True)
    base_params = count_params(config)
    tokens_micro = tokens_per_micro_step(model_path, data, args)

    cases = []
    for layout in args.layouts:
        for ranks in args.ranks:
            tp = LAYOUTS[layout][1]
            if ranks % tp or ranks < tp:
                continue
            print(f"{layout} x {ranks} ranks ...", flush=True)
            case = run_case(args, model_path, data, layout, ranks, workdir)
            zero_stage = 3 if layout == "zero3" else (1 if layout == "tp2" else 2)
            case["bytes_per_step_computed"] = bytes_per_step(
                config, r=args.lora_r, targets=DEFAULT_TARGETS, base_params=base_params, dp=case["dp"], tp=tp,
                zero_stage=zero_stage, micro_steps=case["grad_accum"], tokens_per_micro=tokens_micro)
            print(f"  {case['status']}: {case.get('tokens_per_s_median', 0):.0f} tokens/s, "
                  f"{case['bytes_per_step_computed']['total'] / 1e6:.2f} MB sent per rank per step", flush=True)
            cases.append(case)

    # the same arithmetic at Qwen3-8B shape, 8 data-parallel ranks, bf16 (what a cluster moves; not measured here)
    from transformers import Qwen3Config

    q8b = Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False)
    q8b_params = count_params(q8b)
    tokens_8b = 2048 + 2048  # S clean + S // B blocks of B
    qwen3_8b = {
        stage: bytes_per_step(q8b, r=16, targets=DEFAULT_TARGETS, base_params=q8b_params, dp=8, tp=1,
                              zero_stage=stage, micro_steps=1, tokens_per_micro=tokens_8b, dtype_bytes=2)
        for stage in (2, 3)
    }
    qwen3_8b["tp2_dp4"] = bytes_per_step(q8b, r=16, targets=DEFAULT_TARGETS, base_params=q8b_params, dp=4, tp=2,
                                         zero_stage=1, micro_steps=1, tokens_per_micro=tokens_8b, dtype_bytes=2)

    report = {
        "benchmark": "scaling",
        "started_utc": started.isoformat(),
        "finished_utc": M.utc_now().isoformat(),
        "command": M.command_line(__file__, argv),
        "machine": M.machine_info(),
        "model_path": str(model_path),
        "model_shape": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                         "num_attention_heads", "num_key_value_heads", "head_dim",
                                                         "vocab_size")},
        "train_data": str(data),
        "base_params": base_params,
        "tokens_per_micro_step_per_rank": tokens_micro,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "cases": cases,
        "qwen3_8b_shape_8_ranks_bf16_computed": {str(k): v for k, v in qwen3_8b.items()},
    }
    path = M.write_json(args.out, report)
    print(f"report written to {path}")
    return 0 if all(c["status"] == "ok" for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
