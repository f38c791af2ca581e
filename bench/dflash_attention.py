#!/usr/bin/env python
"""Memory and time of the standalone drafter's training attention at Qwen3-8B's shape: SDPA with the training mask and
``enable_gqa=True`` (K/V heads shared) against the K/V heads repeated to the query heads (what
``dflash_model.draft_attention`` on a GPU does with a mask), one layer, one sample.

Default shape: the README's Qwen3-8B recipe, S = 2,048 context rows and 128 blocks of 16 (M = 2,048 block rows over
T = S + M = 4,096 keys), 32 query heads / 8 K/V heads of 128, the training mask (bool ``[1, 1, M, T]``, the block
rows of ``blocks.block_rows_visibility``). A kernel that materialises the scores holds ``32 x 2048 x 4096`` fp32 =
1 GiB of them (the math kernel, which ``enable_gqa`` with a mask falls to on a GPU); the memory-efficient kernel
holds none. Each case runs in its own subprocess (``bench/_measure.py``): peak extra memory (CPU: peak RSS; GPU:
``torch.cuda.max_memory_allocated``) and the median time of a forward + backward.

    python bench/dflash_attention.py --out bench/results/dflash_attention_cpu.json
    python bench/dflash_attention.py --device cuda --dtype bfloat16      # on a GPU (the device tool)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as M  # noqa: E402

CASES = ("gqa", "repeat_kv")


def worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    M.ensure_repo_on_path()
    from dflash_ds.blocks import block_rows_visibility

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    h, hkv, d, S, N, B = (spec[k] for k in ("heads", "kv_heads", "head_dim", "context", "blocks", "block"))
    Mrows, T = N * B, S + N * B
    gen = torch.Generator().manual_seed(0)
    anchors = torch.sort(torch.randperm(S - 1, generator=gen)[:N] + 1).values[None]
    mask = block_rows_visibility(anchors, torch.ones(1, N, dtype=torch.bool), B, torch.ones(1, S, dtype=torch.bool))
    mask = mask[:, None].to(device)
    q = torch.randn(1, h, Mrows, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, hkv, T, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, hkv, T, d, device=device, dtype=dtype, requires_grad=True)

    def step():
        if spec["case"] == "gqa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            rep = h // hkv
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                 attn_mask=mask)
        out.float().square().mean().backward()
        q.grad = k.grad = v.grad = None

    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        res = M.timed_repeats(step, spec["repeats"], sync=torch.cuda.synchronize)
        res["peak_extra_bytes"] = peak
        return res
    return M.measure_case(step, repeats=spec["repeats"], mem_budget_bytes=int(spec["mem_budget_gb"] * M.GIB))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--blocks", type=int, default=128)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-budget-gb", type=float, default=M.default_mem_budget_gb())
    p.add_argument("--out", default=None)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        spec = json.loads(args._worker)
        Path(spec["result_path"]).write_text(json.dumps(worker(spec)))
        return
    base = {k: getattr(args, k) for k in ("device", "dtype", "heads", "kv_heads", "head_dim", "context", "blocks",
                                           "block", "repeats", "mem_budget_gb")}
    scores = args.heads * args.blocks * args.block * (args.context + args.blocks * args.block) * 4
    results = {}
    tmp = tempfile.mkdtemp(prefix="dflash_attention_")
    for case in CASES:
        res = M.run_worker(__file__, {**base, "case": case, "result_path": f"{tmp}/{case}.json"}, label=case)
        results[case] = res
        print(f"{case:10s} peak extra {M.gib(res.get('peak_extra_bytes'))}, median {res.get('median_s', 0):.3f} s "
              f"(forward + backward)", flush=True)
    report = {"config": base, "fp32_scores_bytes": scores, "results": results, "machine": M.machine_info(),
              "command": M.command_line(__file__, argv)}
    print(f"fp32 scores a materialising kernel holds: {M.gib(scores)}")
    if args.out:
        M.write_json(args.out, report)


if __name__ == "__main__":
    main()
