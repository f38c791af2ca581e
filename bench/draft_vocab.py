#!/usr/bin/env python
"""What a draft vocabulary saves in one draft step of the standalone drafter: the weight bytes a step reads and its
CPU time, full vocabulary against draft vocabularies, at SmolLM2-135M's shape and at Qwen3-8B's.

One draft step is what ``DFlashBlockDrafter.propose`` runs: a drafter forward over one block of ``B`` rows with
``B`` new context rows projected into a context cache of ``--context`` rows, then the lm_head over the ``B - 1``
drafted rows and their argmax. Weights are random (the cost depends on the shape only); each case's time is the
median of ``--repeats`` runs after a warm-up, the cases interleaved round by round (this machine's speed drifts).
Bytes are those of bf16 weights (what a GPU reads per step at batch 1): the draft layers, ``fc`` and the head.
With ``--with-target`` the shape's target (random weights) is timed in the same rounds: its 1-row forward after the
cached context (an autoregressive step) and its ``B``-row forward (the verification), so that a decoding step's cost,
verification + draft step, is given in AR steps, the unit docs/recipes.md uses.

    python bench/draft_vocab.py --out bench/results/draft_vocab_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as M  # noqa: E402

# Qwen3-8B's config.json (the dims the drafter copies); SmolLM2's comes from its cached conversion when there
QWEN3_8B = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                max_position_embeddings=40960, rope_theta=1e6)
SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
               max_position_embeddings=8192, rope_theta=100000.0)
SHAPES = {"smollm2": (SMOLLM2, 2, (8192, 4096)), "qwen3_8b": (QWEN3_8B, 1, (32768, 16384))}


def build(shape: dict, layers: int, vocab: int | None, block: int):
    import torch
    from transformers import LlamaConfig, Qwen3Config

    M.ensure_repo_on_path()
    from dflash_ds.kinds.dflash.dflash_model import DFlashDraftModel, init_draft_head, make_draft_config

    cls = Qwen3Config if shape["model_type"] == "qwen3" else LlamaConfig
    target = cls(**{k: v for k, v in shape.items() if k != "model_type"})
    torch.manual_seed(0)
    drafter = DFlashDraftModel(make_draft_config(target, layers, block_size=block, mask_token_id=0,
                                                 draft_vocab_size=vocab)).eval()
    head = torch.randn(shape["vocab_size"], shape["hidden_size"]) * 0.02 if vocab is None else None
    if vocab is not None:
        ids = torch.sort(torch.randperm(shape["vocab_size"])[:vocab]).values
        init_draft_head(drafter, torch.randn(vocab, shape["hidden_size"]), torch.arange(vocab))
        drafter.d2t.copy_(ids - torch.arange(vocab))
    return drafter, head


def build_target(shape: dict, context: int):
    """A timer of the target's forward over ``rows`` new rows after ``context`` cached ones (random weights, the
    shape's decoder): 1 row is an autoregressive step, ``B`` rows the verification of a block."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen3Config

    cls = Qwen3Config if shape["model_type"] == "qwen3" else LlamaConfig
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**{k: v for k, v in shape.items() if k != "model_type"}),
                                             attn_implementation="sdpa").eval()
    ids = torch.randint(shape["vocab_size"], (1, context + 64))

    def forward(rows: int) -> float:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(ids[:, :context], past_key_values=cache, use_cache=True)  # the prompt, untimed
            t0 = time.perf_counter()
            model(ids[:, context:context + rows], past_key_values=cache, use_cache=True).logits.argmax(-1)
            return time.perf_counter() - t0

    return forward


def weight_bytes(drafter, head, bytes_per: int = 2) -> int:
    n = sum(p.numel() for p in drafter.parameters())
    n += drafter.lm_head.weight.numel() if drafter.has_own_lm_head else head.numel()
    return n * bytes_per


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2,qwen3_8b")
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--context", type=int, default=256, help="context rows already cached")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--with-target", default="smollm2",
                    help="shapes whose target is timed too (1-row AR step, B-row verify): a decoding step's cost in "
                         "AR steps. Qwen3-8B's fp32 target needs 33 GB, so it is left out by default")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"machine": M.machine_info(), "command": M.command_line(__file__, argv), "block": args.block,
              "context": args.context, "shapes": {}}
    B = args.block
    for name in args.shapes.split(","):
        shape, layers, vocabs = SHAPES[name]
        H, K = shape["hidden_size"], None
        cases = {}
        for vocab in (None, *vocabs):
            drafter, head = build(shape, layers, vocab, B)
            K = len(drafter.target_layer_ids)
            cases["full" if vocab is None else str(vocab)] = (drafter, head)
        embeds = torch.randn(1, B, H)
        pos = torch.arange(args.context + B, args.context + 2 * B)[None]
        old = torch.randn(1, args.context, K * H)
        new = torch.randn(1, B, K * H)

        def step(drafter, head):
            from dflash_ds.kinds.dflash.dflash_model import DFlashContextCache

            cache = DFlashContextCache(len(drafter.layers))
            with torch.no_grad():
                drafter(embeds, pos, drafter.project_context(old), cache=cache)  # the committed context, untimed
                t0 = time.perf_counter()
                hidden = drafter(embeds, pos, drafter.project_context(new), cache=cache)[0, 1:]
                logits = drafter.lm_head(hidden) if drafter.has_own_lm_head else hidden @ head.t()
                drafter.draft_ids_to_target(logits.argmax(-1))
                return time.perf_counter() - t0

        target = build_target(shape, args.context) if name in args.with_target.split(",") else None
        times = {k: [] for k in cases}
        target_times = {"ar": [], "verify": []}
        for k, (d, h) in cases.items():
            step(d, h)  # warm-up
        if target:
            target(1), target(B)
        for _ in range(args.repeats):
            for k, (d, h) in cases.items():
                times[k].append(step(d, h))
            if target:
                target_times["ar"].append(target(1))
                target_times["verify"].append(target(B))
        full = statistics.median(times["full"])
        ar, verify = (statistics.median(target_times[k]) if target else None for k in ("ar", "verify"))
        rows = {}
        for k, (d, h) in cases.items():
            med = statistics.median(times[k])
            rows[k] = {"draft_step_ms": med * 1e3, "time_vs_full": med / full,
                       "weight_gib_bf16": weight_bytes(d, h) / M.GIB,
                       "bytes_vs_full": weight_bytes(d, h) / weight_bytes(*cases["full"])}
            cost = ""
            if target:
                rows[k]["step_cost_ar_steps"] = (verify + med) / ar
                rows[k]["step_cost_vs_full"] = (verify + med) / (verify + full)
                cost = f", decoding step {rows[k]['step_cost_ar_steps']:.2f} AR steps ({rows[k]['step_cost_vs_full']:.2f}x)"
            print(f"{name:9s} vocab {k:>6s}: draft step {med * 1e3:7.2f} ms ({med / full:.2f}x full), "
                  f"weights {rows[k]['weight_gib_bf16']:.3f} GiB bf16 ({rows[k]['bytes_vs_full']:.2f}x){cost}", flush=True)
        report["shapes"][name] = {"draft_layers": layers, "hidden": H, "vocab": shape["vocab_size"], "cases": rows}
        if target:
            report["shapes"][name]["target"] = {"ar_step_ms": ar * 1e3, "verify_ms": verify * 1e3}
            print(f"{name:9s} target: AR step {ar * 1e3:.2f} ms, verify of {B} rows {verify * 1e3:.2f} ms "
                  f"({verify / ar:.2f} AR steps); a decoding step is verify + draft step", flush=True)
        del cases
    if args.out:
        M.write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
