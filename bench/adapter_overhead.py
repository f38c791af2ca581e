#!/usr/bin/env python
"""What the LoRA adapter adds to a decode forward: ``t(adapter on) / t(adapter off) - 1`` for the same rows.

For each row count ``q`` (default 1, 8, 16, 64) at a fixed cached context, four forwards of the same ``q`` tokens
are timed round-robin (median of ``--repeats``): the adapter off (the verifier) and on, with this checkout's decode
path (:class:`dflash_ds.lora.LoRALinear` with :func:`dflash_ds.lora.stack_projections`, as ``dflash-ds eval`` runs
it) and with the implementation it replaced (every projection its own product, module calls for ``lora_A`` and
``lora_B``, an identity dropout module, then an add: :func:`legacy_forward`, copied from the previous commit), so
the overhead before/after comes from one process on one machine state. Outputs of both paths are checked equal.
A fifth forward times the verify as it ran before the session passed its own causal mask (``attention_mask=None``:
transformers builds one per call), for the saving of that change (``own_mask_over_hf_mask``). Model: the cached tiny target (``dflash-ds tiny-target``) with ``--adapter`` (default: a random
non-zero adapter), or a random Qwen3-shaped model.

    python bench/adapter_overhead.py --adapter demo_work/run/adapter --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as M  # noqa: E402

M.ensure_repo_on_path()


def legacy_forward(self, x):
    """The adapter path before the decode fast path (single process, no TP): module calls and an add."""
    import torch

    y = self.base_layer(x)
    if self.has_adapter and self.control.enabled:
        u = self.lora_A(self._legacy_dropout(x))
        y = torch.add(y, self.lora_B(u), alpha=self.scaling)
    return y


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default=None, help="exported adapter for the cached tiny target (default: random)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 64])
    p.add_argument("--context", type=int, default=150)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="repeat the whole measurement; report the median round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(M.REPO_ROOT / "bench" / "results" / "adapter_overhead.json"))
    args = p.parse_args(argv)

    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from dflash_ds.lora import LoRAConfig, LoRALinear, apply_lora, load_adapter_dir, lora_modules, stack_projections
    from dflash_ds.speculative import DecodeSession
    from dflash_ds.recipes.tiny_target import default_tiny_target_dir, is_tiny_target

    torch.set_num_threads(args.threads)
    target = default_tiny_target_dir()
    if not is_tiny_target(target):
        print(f"no cached tiny target at {target}: run `dflash-ds tiny-target` first", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    if args.adapter:
        load_adapter_dir(model, args.adapter)
    else:
        apply_lora(model, LoRAConfig(r=16, alpha=32.0))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, m in lora_modules(model):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
    for _, m in lora_modules(model):
        m._legacy_dropout = nn.Identity()
    stack_projections(model)
    session = DecodeSession(model, args.context + max(args.rows) + 8, 8)
    L, vocab = args.context, model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    current = LoRALinear.forward

    def run(ids, on: bool, legacy: bool):
        LoRALinear.forward = legacy_forward if legacy else current
        try:
            q = ids.shape[1]
            session.set_adapter(on)
            out = session.forward(ids, L, session.cache, mask=session.mask(L, session.causal(q)), kind="verify")
            session.cache.crop(-q)
            return out
        finally:
            LoRALinear.forward = current

    def run_hf_mask(ids):
        """A verify forward as it ran before the session built its own causal mask: ``attention_mask=None``, so
        transformers builds the mask on every call."""
        q = ids.shape[1]
        session.set_adapter(False)
        out = session.decoder(input_ids=ids, position_ids=session.positions[:, L : L + q], attention_mask=None,
                              use_cache=True, **{session.cache_kw: session.cache})
        session.cache.crop(-q)
        return session.lm_head(out.last_hidden_state[0])

    report: dict[str, Any] = {"benchmark": "adapter overhead of a decode forward", "command": M.command_line(__file__, argv),
                              "date_utc": M.utc_now().isoformat(timespec="seconds"), "machine": M.machine_info(),
                              "config": {**vars(args), "model": str(target),
                                         "shape": {k: getattr(model.config, k) for k in ("hidden_size",
                                                   "num_hidden_layers", "intermediate_size", "vocab_size")}},
                              "rows": {}}
    with torch.no_grad():
        session.set_adapter(False)
        session.forward(torch.randint(0, vocab, (1, L), generator=gen), 0, session.cache, kind="prefill")
        for q in args.rows:
            ids = torch.randint(0, vocab, (1, q), generator=gen)
            same = torch.allclose(run(ids, True, False), run(ids, True, True), atol=1e-5, rtol=1e-5)
            same_mask = torch.allclose(run(ids, False, False), run_hf_mask(ids), atol=1e-5, rtol=1e-5)
            variants = {"off": lambda: run(ids, False, False), "on": lambda: run(ids, True, False),
                        "off_legacy": lambda: run(ids, False, True), "on_legacy": lambda: run(ids, True, True),
                        "off_hf_mask": lambda: run_hf_mask(ids)}
            rounds = []
            for _ in range(args.rounds):
                times = {name: [] for name in variants}
                for i in range(args.repeats + 20):
                    for name, call in variants.items():
                        t0 = time.perf_counter()
                        call()
                        if i >= 20:
                            times[name].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) for k, v in times.items()}
                rounds.append({**{f"t_{k}_s": v for k, v in med.items()},
                               "overhead": med["on"] / med["off"] - 1,
                               "overhead_legacy": med["on_legacy"] / med["off_legacy"] - 1,
                               "verify_new_over_legacy": med["off"] / med["off_legacy"],
                               "own_mask_over_hf_mask": med["off"] / med["off_hf_mask"]})
            r = dict(sorted(rounds, key=lambda x: x["overhead"])[len(rounds) // 2])
            r.update(rounds=rounds, outputs_equal=same, outputs_equal_mask=same_mask,
                     overhead_ratio_new_over_legacy=r["overhead"] / r["overhead_legacy"])
            report["rows"][q] = r
            print(f"q={q:3d}: off {r['t_off_s'] * 1e3:.3f} ms ({r['verify_new_over_legacy']:.2f}x the previous; "
                  f"{r['own_mask_over_hf_mask']:.2f}x with transformers' causal mask); "
                  f"adapter overhead {r['overhead']:.3f} "
                  f"(previous implementation {r['overhead_legacy']:.3f}, ratio {r['overhead_ratio_new_over_legacy']:.2f}); "
                  f"outputs equal {same} / {same_mask}", flush=True)
    print(f"wrote {M.write_json(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
