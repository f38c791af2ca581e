#!/usr/bin/env python
"""Acceptance smoke test: the whole recipe through the real command lines, one PASS/FAIL/SKIP line per check.

Run it as ``bash bench/gpu/run.sh --smoke`` on one GPU (NCCL; the wheels it needs on the device machine are
described in run.sh; ``--budget-s N``, default 420, is the whole call's time, wheel install included: run.sh passes
what is left, less 50 s, as ``--time-budget-s``), or ``bash bench/gpu/run.sh --smoke --device cpu`` anywhere
(2 gloo ranks under DS_ACCELERATOR=cpu; what CI runs, tests/test_gpu_smoke.py). On a random Qwen3 target written
to a temporary directory (``tiny`` shape on the CPU, ``small`` on a GPU) it checks, as a user would run it:

* ``target``: the target, and its own greedy answers (transformers' ``generate``, fp32) to the training prompts:
  the training data (self-distillation, README step 1: so that a few dozen steps give a drafter that drafts well
  enough, tau > 1, for the decoders' accept and cache-crop paths to run) and the reference of the greedy checks;
* ``train zero2`` / ``train zero3``: ``deepspeed --module dflash_ds.train`` with ``ds_configs/zero2.json`` (a
  short run, checkpointed half way) and ``zero3.json`` (the longer run that is exported and evaluated): finite
  losses, every step logged, an adapter written; ``zero2 == zero3``: their common first steps give the same
  losses (same seed and data, constant learning rate: ZeRO changes where the weights live, not the numbers);
  ``training lowers the loss``;
* ``resume == uninterrupted``: the ZeRO-2 run again from its half-way checkpoint (``--resume PATH``) into a fresh
  output directory: the same losses after the checkpoint and the same final adapter;
* ``export``: ``dflash-ds export`` of the ZeRO-3 run's last checkpoint equals the adapter training wrote;
* ``eval compile=C`` for ``--compile none``, ``static`` and ``compile`` (fp32, ``--loop both``) on the exported
  adapter, and ``greedy compile=C ...``: the AR engine's, the two-forward loop's and the fused loop's outputs
  equal ``generate``'s token for token (fp32, so no near-tied argmax flips); on a GPU also the README's command
  (``--dtype bfloat16 --compile compile``), which must run (bf16 outputs are not compared with fp32 decoding).

On a CPU where ``torch.compile`` cannot build at all (no C++ compiler), the compiled eval's checks print SKIP with
the reason. The last line is ``SMOKE PASS`` or ``SMOKE FAIL`` naming the failed checks; exit status 0 when no
check failed, else 1. Every command's output is in WORKDIR/logs (kept when a check fails).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

#: Model shapes (Qwen3, random weights): ``tiny`` for the CPU, ``small`` for a GPU (still seconds a step).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=32),
}
#: Training flags of every run; a constant learning rate, so that runs of different lengths share their first steps.
TRAIN_FLAGS = ["--block-size", "4", "--max-length", "96", "--micro-batch-size", "2", "--lr", "1e-2", "--seed", "0",
               "--lora-r", "8", "--log-interval", "1", "--warmup-ratio", "0", "--lr-schedule", "constant"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stdlib_lines() -> list[str]:
    return (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().splitlines()


class Smoke:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cuda = args.device.startswith("cuda")
        self.work = Path(args.workdir)
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.results: list[dict[str, str]] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [self.env.get("PYTHONPATH")])])
        self.env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        if not self.cuda:
            self.env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # 2 ranks share the cores
            # inductor's pool of compile workers costs more than it saves for these few small graphs on a small
            # CPU (the compiled eval: 34 s against 77 s on 2 cores)
            self.env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        # tolerances, relative: ZeRO-2 against ZeRO-3 (on a GPU fp32 against bf16: ds_config "bf16": "auto"), and
        # a resumed run against the uninterrupted one (the same stage and dtype; a GPU's atomics may reorder sums)
        self.tol_stage = 5e-2 if self.cuda else 1e-4
        self.tol_resume = 1e-3 if self.cuda else 1e-5

    # ------------------------------------------------------------------------------------------------- reporting

    def report(self, status: str, name: str, detail: str = "") -> bool:
        self.results.append({"status": status, "name": name, "detail": detail})
        print(f"{status} {name}" + (f": {detail}" if detail else ""), flush=True)
        return status == "PASS"

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        return self.report("PASS" if ok else "FAIL", name, detail)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, cmd: list[str], timeout: float) -> tuple[int, str]:
        """Run ``cmd`` from the repository root, output to logs/<name>.log; returns (exit code, output). A
        command that would outlast the time budget is cut there (exit code 124)."""
        left = self.args.time_budget_s - self.elapsed()
        shown = " ".join(shlex.quote(c) for c in cmd).replace(f"{sys.executable} -m dflash_ds.cli ", "dflash-ds ")
        print(f"  $ {shown}", flush=True)
        log = self.logs / f"{name.replace(' ', '_')}.log"
        if left < 5:
            log.write_text("not run: the time budget is spent\n")
            return 124, "not run: --time-budget-s is spent"
        t = time.perf_counter()
        with log.open("w") as f:
            # its own process group: on a timeout the launcher's ranks go with it
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=min(timeout, left))
            except subprocess.TimeoutExpired:
                rc = 124
                f.write(f"\nsmoke: timed out after {min(timeout, left):.0f} s\n")
        try:  # the ranks of a launcher that timed out, or that exited when one rank failed
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        print(f"    exit {rc} after {time.perf_counter() - t:.1f} s", flush=True)
        return rc, log.read_text(errors="replace")

    def fail_detail(self, rc: int, out: str, lines: int = 25) -> str:
        """The exit code and the output's last lines, without DeepSpeed's INFO lines and progress bars."""
        kept = [line for line in out.replace("\r", "\n").splitlines()
                if line.strip() and "] [INFO] [" not in line and "it/s]" not in line and "examples/s]" not in line]
        tail = "\n".join("    | " + line for line in kept[-lines:])
        return f"exit {rc}\n{tail}"

    # ------------------------------------------------------------------------------------------------- inputs

    def write_inputs(self) -> None:
        """A random tiny Qwen3 target (byte-level BPE with ChatML and <|mask|>) and conversations made of stdlib
        source lines: ``--train-prompts`` of them to self-distil, the first ``--prompts`` also the eval prompts."""
        import random

        import torch
        from transformers import AutoModelForCausalLM, Qwen3Config

        from dflash_ds.recipes.tokenizer import train_tokenizer

        self.target = self.work / "target"
        src = stdlib_lines()
        tokenizer = train_tokenizer(["\n".join(src)], vocab_size=self.args.vocab)
        config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                             initializer_range=0.05, **SHAPES[self.args.shape])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id, cfg.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        model.save_pretrained(self.target)
        tokenizer.save_pretrained(self.target)

        rng = random.Random(0)
        lines = []
        for _ in range(self.args.train_prompts):
            start = rng.randrange(0, len(src) - 12)
            user = "\n".join(src[start : start + 2]).strip() or "def f():"
            lines.append(json.dumps({"conversations": [{"role": "user", "content": user}]}) + "\n")
        self.train_prompts = self.work / "train_prompts.jsonl"
        self.train_prompts.write_text("".join(lines))
        self.prompts = self.work / "eval_prompts.jsonl"
        self.prompts.write_text("".join(lines[: self.args.prompts]))
        self.data = self.work / "train_regen.jsonl"

    def self_distil(self) -> str:
        """transformers' greedy ``generate`` (fp32, the target without adapter) on every training prompt, cut after
        the first EOS as every decoder of ``dflash-ds eval`` is. These are the reference outputs of the greedy
        checks (the eval prompts are the first ones), and, as the assistant turns of the training data, the
        self-distillation of README step 1 (what ``dflash-ds regenerate`` writes): the drafter trains on the
        target's own answers, the eval prompts' among them, so after a few dozen steps it drafts well enough
        (tau > 1) for the decoders' accept, reject and cache-crop paths to run, not only the reject-everything
        path of an untrained adapter."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from dflash_ds.evaluate import load_prompts
        from dflash_ds.speculative.engine import eos_ids_of

        tokenizer = AutoTokenizer.from_pretrained(self.target)
        model = AutoModelForCausalLM.from_pretrained(self.target, dtype=torch.float32).to(self.args.device).eval()
        self.eos = eos_ids_of(tokenizer, model)
        self.reference: list[list[int]] = []
        self.prompt_ids: list[list[int]] = []
        records = []
        conversations = [json.loads(line)["conversations"] for line in self.train_prompts.read_text().splitlines()]
        for conv, ids in zip(conversations, load_prompts(self.train_prompts, tokenizer)):
            x = torch.tensor([ids], device=self.args.device)
            with torch.no_grad():
                y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=self.args.max_new_tokens, eos_token_id=self.eos,
                                   pad_token_id=tokenizer.pad_token_id)
            new = y[0, len(ids) :].tolist()
            cut = next((i + 1 for i, t in enumerate(new) if t in self.eos), len(new))
            self.reference.append(new[:cut])
            self.prompt_ids.append(list(ids))
            answer_ids = [t for t in new[:cut] if t not in self.eos]
            answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
            if answer.strip():  # the record dflash-ds regenerate writes: text, the target's own ids, truncated
                records.append({"conversations": [*conv, {"role": "assistant", "content": answer}],
                                "answer_ids": answer_ids, "truncated": new[cut - 1] not in self.eos})
        self.data.write_text("".join(json.dumps(r) + "\n" for r in records))
        tokens = sum(map(len, self.reference))
        return f"{len(records)} greedy answers ({tokens} tokens) of the target as training data and references"

    # ------------------------------------------------------------------------------------------------- training

    def train_cmd(self, out: Path, config: Path, steps: int, save: int, *extra: str) -> list[str]:
        from dflash_ds.recipes.launcher import deepspeed_launcher

        return [*deepspeed_launcher(), "--num_gpus", str(self.args.ranks), "--master_port", str(free_port()),
                "--module", "dflash_ds.train", "--deepspeed_config", str(config),
                "--model-path", str(self.target), "--train-data", str(self.data), "--output-dir", str(out),
                "--max-steps", str(steps), "--save-interval", str(save), *TRAIN_FLAGS, *extra]

    @staticmethod
    def losses(out: Path) -> dict[int, float]:
        path = out / "metrics.jsonl"
        if not path.exists():
            return {}
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r}

    def train(self, name: str, out: Path, config: Path, steps: int, save: int, *extra: str,
              first_step: int = 1, artifact: str = "adapter/adapter_model.safetensors") -> bool:
        rc, log = self.run(name, self.train_cmd(out, config, steps, save, *extra), timeout=self.args.step_timeout_s)
        self.last_log = log
        if rc != 0:
            return self.report("FAIL", name, self.fail_detail(rc, log))
        losses = self.losses(out)
        want = list(range(first_step, steps + 1))
        if sorted(losses) != want:
            return self.report("FAIL", name, f"metrics.jsonl has steps {sorted(losses)}, expected {want}")
        if not all(math.isfinite(v) for v in losses.values()):
            return self.report("FAIL", name, f"non-finite loss: {losses}")
        if not (out / artifact).exists():
            return self.report("FAIL", name, f"no {out / artifact}")
        shown = ", ".join(f"{losses[s]:.4f}" for s in want[:4]) + (f", ... {losses[want[-1]]:.4f}" if len(want) > 4
                                                                    else "")
        return self.report("PASS", name, f"{self.args.ranks} rank(s), steps {want[0]}-{want[-1]}, loss {shown}")

    def close(self, a: dict[int, float], b: dict[int, float], tol: float) -> tuple[bool, float]:
        steps = sorted(set(a) & set(b))
        worst = max((abs(a[s] - b[s]) / max(1.0, abs(a[s])) for s in steps), default=math.inf)
        return bool(steps) and worst <= tol, worst

    @staticmethod
    def adapter_diff(a: Path, b: Path) -> tuple[float, str]:
        """Largest |difference| between two adapter directories' tensors, relative to the largest |weight|
        (inf when the keys or shapes differ), and a note."""
        from safetensors.torch import load_file

        ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
        if ta.keys() != tb.keys():
            return math.inf, f"keys differ: {sorted(set(ta) ^ set(tb))[:4]}"
        worst, scale = 0.0, 1e-12
        for k in ta:
            if ta[k].shape != tb[k].shape:
                return math.inf, f"{k}: {tuple(ta[k].shape)} vs {tuple(tb[k].shape)}"
            x, y = ta[k].float(), tb[k].float()
            worst = max(worst, (x - y).abs().max().item())
            scale = max(scale, x.abs().max().item())
        return worst / scale, f"{len(ta)} tensors, max |diff| / max |w| = {worst / scale:.2e}"

    # ------------------------------------------------------------------------------------------------- eval

    def eval_cmd(self, adapter: Path, report: Path, compile_: str, dtype: str = "float32") -> list[str]:
        cmd = [sys.executable, "-m", "dflash_ds.cli", "eval", "--model-path", str(self.target), "--adapter",
               str(adapter), "--prompts", str(self.prompts), "--report", str(report), "--device", self.args.device,
               "--dtype", dtype, "--max-new-tokens", str(self.args.max_new_tokens), "--repeats", "1",
               "--baselines", "none", "--loop", "both", "--compile", compile_, "--no-progress"]
        return cmd

    @staticmethod
    def eval_names(compile_: str) -> list[str]:
        tag = f"compile={compile_}"
        return [f"eval {tag}", f"greedy {tag} AR engine == generate", f"greedy {tag} two_forward loop == generate",
                f"greedy {tag} fused loop == generate"]

    def evaluate(self, adapter: Path, compile_: str) -> None:
        report_path = self.work / f"eval_{compile_}.json"
        rc, log = self.run(f"eval_{compile_}", self.eval_cmd(adapter, report_path, compile_),
                           timeout=self.args.step_timeout_s)
        names = self.eval_names(compile_)
        if rc != 0 or not report_path.exists():
            if compile_ == "compile" and not self.cuda and not self.compile_works():
                for n in names:
                    self.report("SKIP", n, f"torch.compile cannot build on this CPU ({self._compile_error})")
                return
            self.report("FAIL", names[0], self.fail_detail(rc, log))
            for n in names[1:] + (["drafts accepted"] if compile_ == "none" else []):
                self.report("FAIL", n, "no report (the eval failed)")
            return
        report = json.loads(report_path.read_text())
        cfg = report["config"]
        self.check(names[0], True, f"tau {report['tau']:.2f} ({report['loop']} loop), "
                                   f"{cfg['num_prompts']} prompts x {cfg['max_new_tokens']} tokens on "
                                   f"{cfg.get('device')} {cfg.get('dtype')}")
        if list(cfg["eos_token_ids"]) != self.eos:
            self.report("FAIL", names[1], f"the eval stops on {cfg['eos_token_ids']}, generate on {self.eos}")
        ref = self.reference[: len(report["per_prompt"])]
        ar = [p["ar_ids"] for p in report["per_prompt"]]
        spec = [p["spec_ids"] for p in report["per_prompt"]]

        self.compare(names[1], ar)
        other = report["baselines"].get("drafter_other_loop") or {}
        if compile_ == "none":  # tau 1.00 would mean no draft was ever accepted: the accept paths never ran
            taus = {report["loop"]: report["tau"], other.get("loop"): other.get("tau") or 0.0}
            self.check("drafts accepted", all(t > 1.0 for t in taus.values()),
                       ", ".join(f"tau {t:.2f} ({loop})" for loop, t in taus.items()) + " > 1")
        loops = {report["loop"]: ("direct", spec), other.get("loop"): ("via AR", other.get("greedy_match"))}
        for loop, name in (("two_forward", names[2]), ("fused", names[3])):
            kind, value = loops.get(loop, (None, None))
            if kind == "direct":
                self.compare(name, value)
            elif kind == "via AR":
                # the report compares this loop to the AR engine, which is compared to generate above
                ar_ok = all(a == r for a, r in zip(ar, ref))
                mism = other.get("mismatched_prompts")
                self.check(name, bool(value) and ar_ok,
                           f"equal to the AR engine on every prompt (report), AR == generate: {ar_ok}"
                           if value else f"differs from the AR engine on prompts {mism}")
            else:
                self.report("FAIL", name, f"the report has no {loop} loop (loop {report['loop']!r}, "
                                          f"other {other.get('loop')!r})")

    def compare(self, name: str, got: list[list[int]]) -> None:
        """PASS when every prompt's tokens equal transformers' generate (``self.reference``), else where they part."""
        ref = self.reference[: len(got)] if got else self.reference
        bad = [i for i, (g, r) in enumerate(zip(got, ref)) if g != r]
        if len(got) != len(ref):
            bad = bad or list(range(len(ref)))
        detail = f"{len(ref)} prompts, {sum(map(len, ref))} tokens identical"
        if bad:
            i = bad[0]
            first = next((k for k, (a, b) in enumerate(zip(got[i], ref[i])) if a != b),
                         min(len(got[i]), len(ref[i])))
            detail = (f"prompts {bad} differ; prompt {i} from token {first}: got {got[i][first:first + 8]}, "
                      f"generate {ref[i][first:first + 8]}; {self.logit_gap(i, ref[i][:first])}")
        self.check(name, not bad, detail)

    def standalone(self, config: Path, steps: int) -> None:
        """The standalone DFlash drafter (``--drafter dflash``, one layer) on ZeRO-3: trained, exported in the
        published format, and decoded side by side with nothing else; its output must be generate's."""
        out = self.work / "dflash_zero3"
        names = ["train dflash zero3", "dflash drafter lowers the loss", "greedy dflash drafter == generate"]
        if not self.train(names[0], out, config, steps, steps, "--drafter", "dflash", "--draft-layers", "1",
                          artifact="drafter/model.safetensors"):
            for n in names[1:]:
                self.report("FAIL", n, "the standalone drafter's training failed")
            return
        losses = self.losses(out)
        self.check(names[1], losses[steps] < losses[1], f"{losses[1]:.3f} -> {losses[steps]:.3f} in {steps} steps")
        report_path = self.work / "eval_dflash.json"
        cmd = [sys.executable, "-m", "dflash_ds.cli", "eval", "--model-path", str(self.target), "--drafter",
               str(out / "drafter"), "--prompts", str(self.prompts), "--report", str(report_path), "--device",
               self.args.device, "--dtype", "float32", "--max-new-tokens", str(self.args.max_new_tokens),
               "--repeats", "1", "--baselines", "none", "--compile", "none", "--no-progress"]
        rc, log = self.run("eval_dflash", cmd, timeout=self.args.step_timeout_s)
        if rc != 0 or not report_path.exists():
            self.report("FAIL", names[2], self.fail_detail(rc, log))
            return
        report = json.loads(report_path.read_text())
        self.compare(names[2], [p["spec_ids"] for p in report["per_prompt"]])

    def logit_gap(self, i: int, prefix: list[int]) -> str:
        """The target's top-2 logit gap (fp32) where an output left generate's: a gap near fp32 round-off (1e-5)
        is a near tie that another summation order may flip; a large one is a decoding bug."""
        try:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.target, dtype=torch.float32).to(self.args.device)
            x = torch.tensor([self.prompt_ids[i] + prefix], device=self.args.device)
            with torch.no_grad():
                top = model(x).logits[0, -1].float().topk(2).values
            return f"generate's top-2 logit gap there: {(top[0] - top[1]).item():.2e}"
        except Exception as exc:  # noqa: BLE001 - a diagnostic only
            return f"(no logit gap: {type(exc).__name__}: {exc})"

    def evaluate_bf16(self, adapter: Path) -> None:
        """The README's GPU command: bf16, compiled (static cache, CUDA graphs), both loops: it must run."""
        name = "eval bf16 compile=compile (README command)"
        report_path = self.work / "eval_bf16.json"
        rc, log = self.run("eval_bf16", self.eval_cmd(adapter, report_path, "compile", "bfloat16"),
                           timeout=self.args.step_timeout_s)
        if rc != 0 or not report_path.exists():
            self.report("FAIL", name, self.fail_detail(rc, log))
            return
        r = json.loads(report_path.read_text())
        other = r["baselines"].get("drafter_other_loop") or {}
        ok = r["tau"] >= 1.0 and other.get("tau", 0) >= 1.0
        self.check(name, ok, f"tau {r['tau']:.2f} ({r['loop']}), {other.get('tau', 0):.2f} ({other.get('loop')}); "
                             f"equal to the bf16 AR engine: {r['greedy_match']}, {other.get('greedy_match')} "
                             "(not required in bf16)")

    def compile_works(self) -> bool:
        """Can torch.compile build anything here (a C++ compiler for inductor's CPU code)?"""
        if getattr(self, "_compile_ok", None) is None:
            code = "import torch\nf = torch.compile(lambda x: x * 2 + 1)\nassert f(torch.ones(3)).sum() == 9"
            proc = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                                  timeout=300)
            self._compile_ok = proc.returncode == 0
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            errors = [line for line in lines if "Error" in line] or lines  # not the "set TORCHDYNAMO_VERBOSE" hint
            self._compile_error = errors[-1].strip()[:240] if errors else f"exit {proc.returncode}"
        return self._compile_ok

    # ------------------------------------------------------------------------------------------------- all

    def main(self) -> int:
        a = self.args
        print(f"smoke: device {a.device}, {a.ranks} rank(s), shape {a.shape}, {a.steps} + {a.train_steps} steps, "
              f"workdir {self.work}", flush=True)
        try:
            self.write_inputs()
            detail = self.self_distil()
            self.report("PASS", "target", f"random Qwen3 ({a.shape}) in {self.work}; {detail}")
        except Exception:  # noqa: BLE001 - nothing else can run
            import traceback

            self.report("FAIL", "target", traceback.format_exc())
            return self.summary()

        # ZeRO-2: a short run checkpointed half way, then resumed from that checkpoint into a fresh directory (on a
        # GPU in fp32, so that the resumed run can be held to the uninterrupted one closely).
        # ZeRO-3: the repo's zero3.json (bf16 on a GPU), the longer run whose adapter is exported and evaluated.
        short, half, long = a.steps, max(a.steps // 2, 1), a.train_steps
        out2, out2r, out3 = self.work / "zero2", self.work / "zero2_resumed", self.work / "zero3"
        zero2, zero3 = ROOT / "ds_configs" / "zero2.json", ROOT / "ds_configs" / "zero3.json"
        if self.cuda:
            cfg = json.loads(zero2.read_text())
            cfg["bf16"] = {"enabled": False}
            zero2 = self.work / "zero2_fp32.json"
            zero2.write_text(json.dumps(cfg, indent=2))
        ok2 = self.train("train zero2", out2, zero2, short, half)
        ok3 = self.train("train zero3", out3, zero3, long, long, "--resume", "auto")
        if ok2 and ok3:
            same, worst = self.close(self.losses(out2), self.losses(out3), self.tol_stage)
            self.check("zero2 == zero3", same,
                       f"steps 1-{short}: losses within {worst:.1e} (tolerance {self.tol_stage:.0e})")
        else:
            self.report("FAIL", "zero2 == zero3", "needs both training runs")
        if ok3:
            losses = self.losses(out3)
            first, last = losses[1], losses[long]
            self.check("training lowers the loss", last < first, f"zero3: {first:.3f} -> {last:.3f} in {long} steps")
        else:
            self.report("FAIL", "training lowers the loss", "needs the ZeRO-3 run")

        if ok2:
            ckpt = out2 / "checkpoints" / f"step_{half:08d}"
            if self.train("resume zero2", out2r, zero2, short, half, "--resume", str(ckpt), first_step=half + 1):
                log = self.last_log
                same, worst = self.close(self.losses(out2), self.losses(out2r), self.tol_resume)
                diff, note = self.adapter_diff(out2 / "adapter", out2r / "adapter")
                self.check("resume == uninterrupted", "resumed from" in log and same and diff <= self.tol_resume,
                           f"from {ckpt.name}: losses within {worst:.1e}, adapter {note}")
            else:
                self.report("FAIL", "resume == uninterrupted", "the resumed run failed")
        else:
            self.report("FAIL", "resume zero2", "needs the ZeRO-2 run")
            self.report("FAIL", "resume == uninterrupted", "needs the ZeRO-2 run")

        exported = self.work / "exported"
        source = out3 if ok3 else out2
        if ok3 or ok2:
            rc, log = self.run("export", [sys.executable, "-m", "dflash_ds.cli", "export",
                                          str(source / "checkpoints"), str(exported)], timeout=120)
            if rc != 0 or not (exported / "adapter_model.safetensors").exists():
                self.report("FAIL", "export", self.fail_detail(rc, log))
            else:
                diff, note = self.adapter_diff(source / "adapter", exported)
                meta = [json.loads((d / "dflash.json").read_text()) for d in (source / "adapter", exported)]
                keys = ("block_size", "mask_token_id", "scope")
                same_meta = all(meta[0].get(k) == meta[1].get(k) for k in keys)
                self.check("export", diff <= (1e-6 if not self.cuda else 1e-2) and same_meta,
                           f"{source.name}'s last checkpoint == the adapter training wrote: {note}; dflash.json "
                           f"{'same' if same_meta else 'differs'} ({', '.join(f'{k} {meta[1].get(k)}' for k in keys)})")
        else:
            self.report("FAIL", "export", "no training run finished")

        adapter = exported if (exported / "adapter_model.safetensors").exists() else None
        for compile_ in ("none", "static", "compile"):
            if adapter is None:
                for n in self.eval_names(compile_) + (["drafts accepted"] if compile_ == "none" else []):
                    self.report("FAIL", n, "no exported adapter")
                continue
            self.evaluate(adapter, compile_)
        self.standalone(zero3, long)
        if self.cuda:
            if adapter is None:
                self.report("FAIL", "eval bf16 compile=compile (README command)", "no exported adapter")
            else:
                self.evaluate_bf16(adapter)
        return self.summary()

    def summary(self) -> int:
        failed = [r["name"] for r in self.results if r["status"] == "FAIL"]
        counts = {s: sum(r["status"] == s for r in self.results) for s in ("PASS", "FAIL", "SKIP")}
        if self.args.json:
            Path(self.args.json).write_text(json.dumps({"device": self.args.device, "results": self.results,
                                                        "seconds": self.elapsed()}, indent=2))
        verdict = "SMOKE PASS" if not failed else "SMOKE FAIL"
        print(f"{verdict}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
              f"{self.elapsed():.0f} s" + (f" (failed: {'; '.join(failed)})" if failed else ""), flush=True)
        return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (NCCL, one rank per GPU) or cpu (gloo) (default cuda)")
    p.add_argument("--ranks", type=int, default=None, help="training ranks (default: 1 on a GPU, 2 on the CPU)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: small on a GPU, tiny on the CPU")
    p.add_argument("--vocab", type=int, default=400, help="tokenizer vocabulary (default 400)")
    p.add_argument("--steps", type=int, default=4,
                   help="steps of the ZeRO-2 run (checkpointed and resumed half way) (default 4)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="steps of the ZeRO-3 run that is exported and evaluated (default: 60 on a GPU, 40 on the CPU)")
    p.add_argument("--train-prompts", type=int, default=8, help="prompts self-distilled for training (default 8)")
    p.add_argument("--prompts", type=int, default=3, help="eval prompts, the first of the training prompts (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 48 on a GPU, 24 on the CPU")
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed after a pass")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--time-budget-s", type=float, default=450.0,
                   help="no command runs past this many seconds from the start (default 450; run.sh --smoke sets "
                        "it from its --budget-s, less the wheel install)")
    p.add_argument("--step-timeout-s", type=float, default=300.0, help="limit of one command (default 300)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.ranks = args.ranks or (1 if cuda else 2)
    args.shape = args.shape or ("small" if cuda else "tiny")
    args.max_new_tokens = args.max_new_tokens or (48 if cuda else 24)
    args.train_steps = args.train_steps or (60 if cuda else 40)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the resume check restarts half way)")
    if args.train_steps < args.steps:
        p.error("--train-steps must be >= --steps (the ZeRO-2 and ZeRO-3 runs are compared over --steps)")
    if not 1 <= args.prompts <= args.train_prompts:
        p.error("--prompts must be in [1, --train-prompts]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("FAIL cuda: torch sees no CUDA device (use --device cpu for the CPU smoke)", flush=True)
            return 1
    from dflash_ds.recipes.launcher import LauncherNotFound, deepspeed_launcher

    try:
        deepspeed_launcher()
    except LauncherNotFound as exc:
        print(f"FAIL deepspeed: {exc}", flush=True)
        return 1
    keep = args.workdir is not None
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="dflash_smoke_")
    rc = Smoke(args).main()
    if rc == 0 and not keep:
        import shutil

        shutil.rmtree(args.workdir, ignore_errors=True)
    elif rc != 0:
        print(f"smoke: logs kept in {Path(args.workdir) / 'logs'}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
