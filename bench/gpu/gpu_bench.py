#!/usr/bin/env python
"""One-call GPU benchmark for a lent H100: training step of a Qwen3-8B-shaped drafter, decode forwards of Qwen3-1.7B.

Run it through ``bench/gpu/run.sh`` (which installs the carried wheels first); it prints one JSON object at the end
and writes it to ``--out`` (default ``$OUT/gpu_bench.json`` when ``$OUT`` is set). Parts, in order, each guarded
(an error or out-of-memory is recorded and the next part runs) and skipped once ``--time-budget-s`` is spent:

1. ``train_8b``: a Qwen3-8B-shaped model (random weights from a config, bf16, SDPA) with gated LoRA (r 16, alpha 32,
   scope ``block``, q/k/v/o/gate/up/down) through :class:`dflash_ds.kinds.lora.lora_objective.LoRADraftObjective` and the fused CE + KL loss
   over ``[clean S | N*B block tokens]`` (default S = 2048, B = 16, N = 128, so 4096 tokens in one forward; the
   additive 4D mask through SDPA):
     * ``dflash_gc``: forward + backward with activation checkpointing (non-reentrant), as the trainer runs it;
     * ``dflash_gc_deepspeed``: the trainer's full step: ``deepspeed.initialize`` with ``ds_configs/zero2.json``
       resolved by ``dflash_ds.config.resolve_ds_config`` (bf16, ZeRO-2, AdamW), ``engine(...)``,
       ``engine.backward``, ``engine.step``;
     * ``dflash``: forward + backward without checkpointing;
     * ``naive``: the naive DFlash step (materialised logits, separate adapter-off teacher forward; see
       ``bench/train_step.py``) on the same model;
     * ``ar_gc`` / ``ar``: a plain PEFT LoRA step over the same number of tokens on a fresh model (PEFT wraps it).
     * ``long_dflash_gc`` / ``long_naive_gc`` / ``long_dflash_gc_flex``: (a), (c) and (a) through FlexAttention, all
       checkpointed, at S = ``--long-seq`` (8192: 8k block tokens, 16k tokens in the forward), where the issue
       states its c/a goal; 2 timed steps each, none started after ``--long-start-by-s``.
   Per case: median step time (CUDA-synchronised ``perf_counter``), trained tokens/s (tokens in the forward /
   step time; supervised block rows/s too), ``torch.cuda.max_memory_allocated`` (absolute and above what was
   allocated before the case's steps).
2. ``decode_1p7b``: a Qwen3-1.7B-shaped model (bf16, random weights, random non-zero gated adapter): one AR step,
   one draft forward and one verify forward for B = 4, 8, 16 at a few context lengths, through the engine and
   drafter of ``dflash_ds.speculative`` (``bench/spec_decode.py``'s ``forward_costs``), and the speedup bound per
   unit of tau, ``t_AR / (t_draft + t_verify)``.
3. ``flex_attention``: the dflash-ds step with checkpointing through FlexAttention's sparse block mask
   (``dflash_gc_flex``) next to the same step through SDPA's dense additive mask (``dflash_gc``).

``--cpu-smoke`` runs every part with tiny shapes on the CPU (fp32, DeepSpeed on gloo) to test the code path
without a GPU; without it the script exits at once (code 3) when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))
import _measure as M  # noqa: E402

M.ensure_repo_on_path()

SHAPES = {
    # Qwen3-8B / Qwen3-1.7B config.json (hidden, layers, heads, kv heads, head_dim, intermediate, vocab, tied)
    "qwen3-8b": dict(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=12288, vocab=151936,
                     tie=False),
    "qwen3-1.7b": dict(hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=6144, vocab=151936,
                       tie=True),
    # --cpu-smoke: the same code on shapes a laptop runs in seconds
    "smoke-train": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000,
                        tie=False),
    "smoke-decode": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000,
                         tie=True),
}


class Bench:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.cuda = not args.cpu_smoke
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.t0 = time.perf_counter()
        self.report: dict[str, Any] = {}

    # ------------------------------------------------------------------ plumbing
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self, part: str) -> bool:
        if self.elapsed() > self.args.time_budget_s:
            self.report.setdefault("skipped", []).append(f"{part}: time budget {self.args.time_budget_s} s spent")
            print(f"[{self.elapsed():6.1f}s] {part}: skipped (time budget)", flush=True)
            return True
        return False

    def save(self) -> None:
        self.report["elapsed_s"] = self.elapsed()
        M.write_json(self.args.out, self.report)

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def guarded(self, name: str, fn: Callable[[], Any], into: dict) -> None:
        """Run ``fn``; its result (or the error) goes to ``into[name]``; the report is saved after each case."""
        import torch

        if self.out_of_time(name):
            into[name] = {"status": "skipped_time_budget"}
            return
        print(f"[{self.elapsed():6.1f}s] {name} ...", flush=True)
        try:
            into[name] = {"status": "ok", **fn()}
            brief = {k: v for k, v in into[name].items() if isinstance(v, (int, float, str)) and k != "status"}
            print(f"[{self.elapsed():6.1f}s] {name}: {json.dumps(brief)}", flush=True)
        except torch.cuda.OutOfMemoryError as exc:
            into[name] = {"status": "out_of_memory", "error": str(exc).splitlines()[0][:300]}
            print(f"[{self.elapsed():6.1f}s] {name}: out of memory", flush=True)
        except Exception as exc:  # noqa: BLE001 - record and go on with the next case
            into[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500],
                          "traceback": traceback.format_exc()[-3000:]}
            print(f"[{self.elapsed():6.1f}s] {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
        self.free()
        self.save()

    def time_step(self, step: Callable[[], Any], tokens: int, rows: int, steps: int | None = None,
                  warmup: int | None = None) -> dict[str, Any]:
        """Median time of ``step`` after warm-up, and the peak memory of the timed steps."""
        import torch

        steps = steps or self.args.steps
        for _ in range(self.args.warmup if warmup is None else warmup):
            step()
        self.sync()
        out: dict[str, Any] = {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            meter = M.PeakRSS().start()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            self.sync()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        out.update(step_s_median=med, step_s_all=times, tokens_in_forward=tokens, supervised_rows=rows,
                   tokens_per_s=tokens / med, supervised_rows_per_s=rows / med)
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            out.update(max_memory_allocated_gib=peak / M.GIB, allocated_before_gib=before / M.GIB,
                       peak_above_before_gib=(peak - before) / M.GIB,
                       max_memory_reserved_gib=torch.cuda.max_memory_reserved() / M.GIB)
        else:
            peak, method = meter.stop()
            out.update(peak_rss_extra_gib=peak / M.GIB, memory_method=method)
        return out

    # ------------------------------------------------------------------ part 1: training
    def model(self, shape_name: str, seed: int = 0):
        from train_step import build_model, qwen3_config

        s = dict(SHAPES[shape_name])
        tie = s.pop("tie")
        cfg = qwen3_config(**s, tie=tie, attn="sdpa")
        t = time.perf_counter()
        m = build_model(cfg, device=self.device, dtype=self.dtype, seed=seed)
        self.sync()
        return m, time.perf_counter() - t

    def deepspeed_step(self, module, params, batch) -> tuple[Callable[[], Any], Any]:
        """The trainer's step: DeepSpeed engine over the objective, ds_configs/zero2.json resolved as train.py does."""

        import deepspeed
        import torch.distributed as dist

        from dflash_ds.config import OptimConfig, TrainConfig, load_ds_config, resolve_ds_config
        from dflash_ds.data import DataConfig

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo", auto_mpi_discovery=False)
        flags = TrainConfig(model_path="", output_dir="/tmp/gpu_bench_ds", data=DataConfig(paths=[]),
                            optim=OptimConfig(micro_batch_size=1, grad_accum=1, grad_clip=1.0, lr=2e-4, weight_decay=0.0))
        ds = resolve_ds_config(load_ds_config(str(M.REPO_ROOT / "ds_configs" / "zero2.json")), flags, 1, self.cuda)
        ds.pop("tensorboard", None)
        engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=[{"params": params}], config=ds)
        engine.train()

        def step():
            out = engine(batch["input_ids"], batch["attention_mask"], batch["layout"])
            engine.backward(out.loss)
            engine.step()
            return out.loss.detach()

        return step, engine

    def train_part(self) -> None:
        from train_step import build_step, make_batch

        a = self.args
        shape = a.train_shape
        res: dict[str, Any] = {"shape": shape, **SHAPES[shape], "seq": a.seq, "block": a.block,
                               "lora_r": 16, "lora_alpha": 32.0, "scope": "block", "loss": "CE 1 + forward KL 1",
                               "chunk_size": a.chunk_size, "dtype": str(self.dtype).replace("torch.", ""),
                               "attention": "sdpa, additive 4D mask [1, 1, S+N*B, S+N*B]"}
        self.report["train_8b"] = res
        cases: dict[str, Any] = {}
        res["cases"] = cases
        batch = make_batch(a.seq, a.block, SHAPES[shape]["vocab"], seed=0, device=self.device)
        tokens, rows = batch["total_tokens"], batch["supervised_rows"]
        res.update(tokens_in_forward=tokens, block_tokens=batch["block_tokens"], supervised_rows=rows)
        kw = dict(r=16, alpha=32.0, chunk=a.chunk_size, seed=0)

        state: dict[str, Any] = {}

        def build():
            state["model"], secs = self.model(shape)
            return {"build_s": secs, "params_billion": sum(p.numel() for p in state["model"].parameters()) / 1e9}

        self.guarded("build_model", build, cases)
        if "model" not in state:
            return

        def run(objective: str, checkpointing: bool, b: dict = batch, steps: int | None = None,
                warmup: int | None = None, clean_pass: str = "auto"):
            def fn():
                step, module, params = build_step(objective, state["model"], checkpointing=checkpointing,
                                                  clean_pass=clean_pass, **kw)
                state["module"], state["params"] = module, params
                return self.time_step(lambda: step(b), b["total_tokens"], b["supervised_rows"], steps, warmup)
            return fn

        self.guarded("dflash_gc", run("dflash", True), cases)
        self.guarded("dflash_gc_joint", run("dflash", True, clean_pass="joint"), cases)
        self.guarded("dflash", run("dflash", False), cases)
        self.guarded("naive", run("naive", False), cases)

        def with_flex(fn):
            # the same model through FlexAttention: LoRADraftObjective builds a sparse BlockMask when the model's
            # attention implementation is flex_attention (dflash_ds.blocks.build_flex_block_mask)
            def wrapped():
                state["model"].config._attn_implementation = "flex_attention"
                try:
                    return fn()
                finally:
                    state["model"].config._attn_implementation = "sdpa"
            return wrapped

        self.guarded("dflash_gc_flex", with_flex(run("dflash", True)), cases)

        # the c/a goal is stated at 8k block tokens: S = --long-seq clean tokens (N*B = S block tokens),
        # checkpointed (the naive step's activations at 16k tokens would not fit otherwise); fewer steps, and none
        # of these starts after --long-start-by-s so the PEFT baseline and the decode part keep their time
        long_batch = make_batch(a.long_seq, a.block, SHAPES[shape]["vocab"], seed=0, device=self.device)
        res["long"] = {"seq": a.long_seq, "block_tokens": long_batch["block_tokens"],
                       "tokens_in_forward": long_batch["total_tokens"],
                       "supervised_rows": long_batch["supervised_rows"]}
        long_kw = dict(b=long_batch, steps=a.long_steps, warmup=1)
        for name, fn in (("long_dflash_gc", run("dflash", True, **long_kw)),
                         ("long_naive_gc", run("naive", True, **long_kw)),
                         ("long_dflash_gc_flex", with_flex(run("dflash", True, **long_kw)))):
            if self.elapsed() > a.long_start_by_s:
                cases[name] = {"status": f"skipped: past --long-start-by-s {a.long_start_by_s}"}
                print(f"[{self.elapsed():6.1f}s] {name}: skipped (past --long-start-by-s)", flush=True)
                continue
            self.guarded(name, fn, cases)
        del long_batch

        def ds_fn():
            # last on this model: ZeRO flattens the LoRA parameters and hooks their gradients for good
            from train_step import set_checkpointing

            step, module, params = build_step("dflash", state["model"], checkpointing=True, **kw)
            set_checkpointing(state["model"], True)
            step, engine = self.deepspeed_step(module, params, batch)
            state["engine"] = engine
            return self.time_step(step, tokens, rows)

        if not a.no_deepspeed:
            self.guarded("dflash_gc_deepspeed", ds_fn, cases)
        if "engine" in state:
            try:  # releases the optimizer's hooks and buffers so the 8B weights can go before the next model
                state["engine"].destroy()
            except Exception as exc:  # noqa: BLE001
                print(f"engine.destroy() failed: {exc}", flush=True)
        state.clear()
        self.free()

        def build_ar():
            state["model"], secs = self.model(shape)
            return {"build_s": secs}

        self.guarded("build_model_ar", build_ar, cases)
        if "model" in state:
            def ar(checkpointing: bool):
                def fn():
                    from train_step import set_checkpointing

                    if "step" not in state:
                        step, module, _ = build_step("ar", state["model"], checkpointing=checkpointing, **kw)
                        state["step"] = step
                    else:
                        set_checkpointing(state["model"], checkpointing)
                    return self.time_step(lambda: state["step"](batch), tokens, rows)
                return fn

            self.guarded("ar_gc", ar(True), cases)
            self.guarded("ar", ar(False), cases)
        state.clear()
        self.free()

        def ratio(num, den, key):
            n, d = cases.get(num, {}), cases.get(den, {})
            if n.get("status") == "ok" and d.get("status") == "ok" and d.get(key):
                return n[key] / d[key]
            return None

        mem = "peak_above_before_gib" if self.cuda else "peak_rss_extra_gib"
        res["ratios"] = {
            "a_gc_over_b_gc_time": ratio("dflash_gc", "ar_gc", "step_s_median"),
            "a_gc_over_b_gc_memory": ratio("dflash_gc", "ar_gc", mem),
            "a_over_b_time": ratio("dflash", "ar", "step_s_median"),
            "a_over_b_memory": ratio("dflash", "ar", mem),
            "c_over_a_time": ratio("naive", "dflash", "step_s_median"),
            "c_over_a_memory": ratio("naive", "dflash", mem),
            "long_c_gc_over_a_gc_time": ratio("long_naive_gc", "long_dflash_gc", "step_s_median"),
            "long_c_gc_over_a_gc_memory": ratio("long_naive_gc", "long_dflash_gc", mem),
            "cached_over_joint_gc_time": ratio("dflash_gc", "dflash_gc_joint", "step_s_median"),
            "cached_over_joint_gc_memory": ratio("dflash_gc", "dflash_gc_joint", mem),
            # FlexAttention runs the joint pass (the cached one is refused there): against SDPA's default, cached
            "flex_over_sdpa_time": ratio("dflash_gc_flex", "dflash_gc", "step_s_median"),
            "long_flex_over_sdpa_time": ratio("long_dflash_gc_flex", "long_dflash_gc", "step_s_median"),
            "memory_key": mem,
        }

    # ------------------------------------------------------------------ part 2: decode forwards
    def decode_part(self) -> None:
        import torch

        from spec_decode import forward_costs
        from dflash_ds.lora import LoRAConfig, apply_lora, lora_modules

        a = self.args
        res: dict[str, Any] = {"shape": a.decode_shape, **SHAPES[a.decode_shape], "scope": "block",
                               "block_sizes": a.block_sizes, "context_lens": a.context_lens,
                               "dtype": str(self.dtype).replace("torch.", "")}
        self.report["decode_1p7b"] = res
        state: dict[str, Any] = {}

        def build():
            model, secs = self.model(a.decode_shape)
            apply_lora(model, LoRAConfig(r=16, alpha=32.0, scope="block"))
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for _, m in lora_modules(model):
                    m.lora_B.weight.copy_((torch.randn(m.lora_B.weight.shape, generator=g) * 0.01).to(self.dtype))
            model.eval()
            state["model"] = model
            return {"build_s": secs}

        self.guarded("build_model", build, res)
        if "model" not in state:
            return
        vocab = SHAPES[a.decode_shape]["vocab"]
        mask_id = 151669 if vocab > 151669 else vocab - 1
        for L in a.context_lens:
            def fn(L=L):
                c = forward_costs(state["model"], mask_id, "block", L, a.block_sizes, repeats=a.fwd_repeats,
                                  warmup=5, sync=self.sync, vocab_high=min(vocab - 1, 151643))
                for B, pb in c["per_block"].items():
                    pb["bound_per_unit_tau"] = pb["t_ar_s"] / (pb["t_draft_s"] + pb["t_verify_s"])
                return c
            self.guarded(f"at_context_{L}", fn, res)
        state.clear()
        self.free()


def main(argv: list[str] | None = None) -> int:
    default_out = (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT")
                   else M.REPO_ROOT / "bench" / "results" / "gpu_bench.json")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: test the code path, no GPU")
    p.add_argument("--seq", type=int, default=None, help="clean tokens S (default 2048; smoke 64)")
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--long-seq", type=int, default=None,
                   help="clean tokens of the long cases, = their block tokens (default 8192; smoke 128)")
    p.add_argument("--long-steps", type=int, default=2, help="timed steps per long case (after one warm-up)")
    p.add_argument("--long-start-by-s", type=float, default=200.0,
                   help="no long case starts after this many seconds (keeps time for the baseline and decode)")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 5; smoke 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--context-lens", type=int, nargs="+", default=None, help="decode context (default 512 2048)")
    p.add_argument("--fwd-repeats", type=int, default=None, help="timed calls per decode forward (default 50)")
    p.add_argument("--parts", nargs="+", default=["train", "decode"], choices=["train", "decode"])
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed engine step")
    p.add_argument("--time-budget-s", type=float, default=420.0,
                   help="no new case starts after this many seconds (run.sh's hard limit is 470 s)")
    p.add_argument("--out", default=str(default_out))
    args = p.parse_args(argv)

    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible to torch "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); this script needs a GPU. "
              "Use --cpu-smoke to test the code path on the CPU.", file=sys.stderr, flush=True)
        return 3
    args.train_shape = "smoke-train" if smoke else "qwen3-8b"
    args.decode_shape = "smoke-decode" if smoke else "qwen3-1.7b"
    args.seq = args.seq or (64 if smoke else 2048)
    args.long_seq = args.long_seq or (128 if smoke else 8192)
    args.steps = args.steps or (2 if smoke else 5)
    args.context_lens = args.context_lens or ([32] if smoke else [512, 2048])
    args.fwd_repeats = args.fwd_repeats or (5 if smoke else 50)
    if smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(1)  # tiny shapes: more threads only contend with whatever else runs

    bench = Bench(args)
    started = M.utc_now()
    bench.report.update({
        "benchmark": "gpu_bench: Qwen3-8B-shaped dflash-ds training step, Qwen3-1.7B-shaped decode forwards",
        "mode": "cpu-smoke (tiny shapes, CPU, fp32: code-path test, figures meaningless)" if smoke else "gpu",
        "command": M.command_line(__file__, argv),
        "date_utc": started.isoformat(timespec="seconds"),
        "machine": M.machine_info(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "flex_attention": "train_8b.cases.dflash_gc_flex (sparse BlockMask) next to dflash_gc (SDPA, dense mask)",
    })
    print(f"gpu_bench: {bench.report['mode']}; device {bench.report['machine'].get('gpu_name', 'cpu')}", flush=True)
    bench.save()
    if "train" in args.parts:
        bench.train_part()
    if "decode" in args.parts:
        bench.decode_part()
    bench.save()
    print(json.dumps(bench.report, indent=1, default=str), flush=True)
    print(summary(bench.report), flush=True)
    print(f"wrote {args.out}", flush=True)
    return 0


def summary(report: dict) -> str:
    """A short table (the device tool returns only the end of the output)."""
    lines = [f"== gpu_bench summary ({report['mode']}; {report['machine'].get('gpu_name', 'cpu')}; "
             f"torch {report['machine']['torch_version']}; {report['date_utc']}) =="]
    train = report.get("train_8b", {})
    for name, c in train.get("cases", {}).items():
        if c.get("status") != "ok" or "step_s_median" not in c:
            lines.append(f"train {name:20s} {c.get('status')} {c.get('error', '')[:150]}")
            continue
        mem = c.get("max_memory_allocated_gib", c.get("peak_rss_extra_gib"))
        lines.append(f"train {name:20s} step {c['step_s_median']:.3f} s  {c['tokens_per_s']:.0f} tok/s  "
                     f"{c['supervised_rows_per_s']:.0f} rows/s  peak {mem:.2f} GiB")
    if train.get("ratios"):
        lines.append("ratios " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                             for k, v in train["ratios"].items()}))
    dec = report.get("decode_1p7b", {})
    for name, c in dec.items():
        if not name.startswith("at_context_"):
            continue
        if c.get("status") != "ok":
            lines.append(f"decode {name} {c.get('status')} {c.get('error', '')[:150]}")
            continue
        for B, pb in c["per_block"].items():
            lines.append(f"decode L={c['context_len']:5d} B={B:2d}: AR {pb['t_ar_s'] * 1e3:.2f} ms, draft "
                         f"{pb['t_draft_s'] * 1e3:.2f} ms ({pb['draft_over_ar']:.2f}x), verify "
                         f"{pb['t_verify_s'] * 1e3:.2f} ms ({pb['verify_over_ar']:.2f}x), bound/tau "
                         f"{pb['bound_per_unit_tau']:.3f}")
    lines.append(f"flex_attention: {report.get('flex_attention')}")
    if report.get("skipped"):
        lines.append(f"skipped: {report['skipped']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
