"""The training recipe: ``deepspeed [--hostfile H] -m dflash_ds.train --deepspeed_config ds_configs/X.json ...``.

Reads top to bottom like SPEC section 2-6: load data, load the frozen target (partitioned under ZeRO-3, sharded
under tensor parallelism), fit the gated LoRA, then for every optimizer step: draw blocks for each sequence, one
forward over ``[clean | blocks]``, the fused CE/KL loss, DeepSpeed backward/step; log, evaluate, checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .blocks import BlockConfig, build_block_layout
from .config import TrainConfig, autotp_size, load_ds_config, parse_train_args, resolve_ds_config
from .families import check_max_length, check_tp_compatible, family_of
from .lora import DraftMeta, apply_lora, lora_parameters
from .mask_token import resolve_mask_token
from .model import DFlashDrafter
from .parallel import (
    ModelParallelUnit,
    ParallelLayout,
    build_parallel_layout,
    check_parallel_sizes,
    exit_on_dist_failure,
    set_dist_timeout,
    setup_timeout,
)

log = logging.getLogger("dflash_ds.train")


# ----------------------------------------------------------------------------------------------------------------
# set-up helpers


def init_distributed(dist_timeout: float) -> None:
    """Join the launcher's process group (deepspeed, torchrun) or make a group of one. Set-up collectives wait
    ``max(dist_timeout, SETUP_TIMEOUT_S)``; :func:`train` tightens every group to ``dist_timeout`` before step 1."""
    import deepspeed

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=setup_timeout(dist_timeout))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Per-example seed for anchors/noise: the same example gets the same blocks on any rank layout."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 12_345) % (2**62)


class StepBatches:
    """Deterministic global batches: step ``g`` of epoch ``e`` takes ``perm_e[g*GB:(g+1)*GB]``; data-parallel rank
    ``r`` gets micro-batch ``i`` as the slice ``[(i*dp + r)*micro, +micro)`` of it. TP ranks share ``r``."""

    def __init__(self, num_examples: int, micro: int, accum: int, dp_size: int, dp_rank: int, seed: int) -> None:
        self.n, self.micro, self.accum, self.dp, self.rank, self.seed = num_examples, micro, accum, dp_size, dp_rank, seed
        self.global_batch = micro * accum * dp_size
        self.steps_per_epoch = num_examples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the data has {num_examples} usable conversations, fewer than one global batch "
                f"({self.global_batch} = micro x accum x data-parallel ranks); add data or shrink the batch"
            )
        self._perm_epoch, self._perm = -1, None

    def micro_batches(self, step: int) -> list[tuple[int, list[int]]]:
        """``[(epoch, example indices)]`` for each micro-step of optimizer step ``step`` on this rank."""
        epoch, local = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        base = local * self.global_batch
        out = []
        for i in range(self.accum):
            start = base + (i * self.dp + self.rank) * self.micro
            out.append((epoch, self._perm[start : start + self.micro]))
        return out


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    warmup = math.ceil(warmup_ratio * total_steps)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def load_target(cfg: TrainConfig, ds: dict, layout: ParallelLayout, dtype: torch.dtype):
    """The frozen target, partitioned at load time under ZeRO-3 (without TP), fitted with the adapter."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds.get("zero_optimization", {}).get("stage", 0) == 3
    keep_alive = None
    if zero3 and layout.tp.size == 1:
        keep_alive = HfDeepSpeedConfig(ds)  # must stay referenced until from_pretrained returns
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype, attn_implementation=cfg.attn_implementation)
    del keep_alive
    apply_lora(model, cfg.lora_config(), tp=layout.tp, seed=cfg.seed)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.config.use_cache = False
    return model


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank or torn one (a run killed while appending it)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


class MetricsLog:
    """``OUTPUT/metrics.jsonl`` (one object per optimizer step) and TensorBoard through DeepSpeed's monitor."""

    def __init__(self, output_dir: str, engine, resume_step: int, is_main: bool) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.engine, self.is_main = engine, is_main
        if is_main:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        # a resumed run rewrites the steps after its checkpoint, so the file reads like an uninterrupted run
        if not self.path.exists():
            return
        keep = [l for l in self.path.read_text().splitlines() if _step_of(l) is not None and _step_of(l) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict, per_position: list[float] | None = None) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            step = record["step"]
            events = [(f"train/{k}", float(v), step) for k, v in record.items() if k != "step" and isinstance(v, (int, float))]
            events += [(f"train/acc_pos_{k}", v, step) for k, v in enumerate(per_position or []) if k > 0]
            monitor.write_events(events)


# ----------------------------------------------------------------------------------------------------------------
# the recipe


def train(cfg: TrainConfig) -> Path:
    import deepspeed
    from transformers import AutoConfig, AutoTokenizer

    from .checkpoint import fault_for_tests, find_checkpoint, load_checkpoint, save_checkpoint
    from .data import DataConfig, build_dataset, collate_batch

    # 1. everything that can be wrong with the flags and the ds_config fails here, before any model loads
    cfg.validate()
    ds_raw = load_ds_config(cfg.deepspeed_config)
    tp_size = autotp_size(ds_raw)
    model_config = AutoConfig.from_pretrained(cfg.model_path)
    family_of(model_config)  # an unsupported architecture fails here, naming the supported ones
    check_tp_compatible(model_config, tp_size)
    check_max_length(model_config, cfg.max_length)
    init_distributed(cfg.dist_timeout)
    check_parallel_sizes(dist.get_world_size(), tp_size)
    layout = build_parallel_layout(tp_size)
    use_bf16 = torch.cuda.is_available()
    ds = resolve_ds_config(ds_raw, cfg, layout.dp_size, use_bf16)
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
    is_main = layout.rank == 0
    torch.manual_seed(cfg.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)

    # 2. data: rank 0 tokenises into the cache first, the others then read it
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    mask = resolve_mask_token(tokenizer, model_config.vocab_size, cfg.mask_token_id)
    if is_main:
        print(f"MASK token: id {mask.token_id} ({mask.token!r}, rule: {mask.rule})", flush=True)
    block_cfg: BlockConfig = cfg.block_config(mask.token_id)
    data_cfg = DataConfig(
        paths=list(cfg.train_data),
        max_length=cfg.max_length,
        bad_lines=cfg.bad_lines,
        truncated=cfg.truncated,
        num_proc=cfg.num_proc,
        cache_dir=str(Path(cfg.output_dir) / "data_cache"),
    )
    if is_main:
        dataset = build_dataset(tokenizer, data_cfg)
    dist.barrier()
    if not is_main:
        dataset = build_dataset(tokenizer, data_cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    batches = StepBatches(len(dataset), micro, accum, layout.dp_size, layout.dp_rank, cfg.seed)
    total_steps = cfg.max_steps or batches.steps_per_epoch * cfg.epochs

    # 3. model: frozen target + adapter, wrapped in the drafter objective, handed to DeepSpeed
    model = load_target(cfg, ds, layout, dtype)
    drafter = DFlashDrafter(model, cfg.loss_config(), cfg.lora_scope)
    lm_head_weight = model.get_output_embeddings().weight
    if hasattr(lm_head_weight, "ds_id"):  # ZeRO-3: gather lm_head for the loss module's forward only
        deepspeed.zero.register_external_parameter(drafter.loss_head, lm_head_weight)
    optimizer_params = [{"params": lora_parameters(model)}]
    engine, _, _, scheduler = deepspeed.initialize(
        model=drafter,
        model_parameters=optimizer_params,
        config=ds,
        mpu=ModelParallelUnit(layout) if tp_size > 1 else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup_ratio, cfg.lr_schedule)),
    )
    meta = DraftMeta(block_size=cfg.block_size, mask_token_id=mask.token_id, scope=cfg.lora_scope,
                     base_model=cfg.model_path, mask_token=mask.token, mask_token_rule=mask.rule)
    layout_key = {"world_size": layout.world_size, "tp": tp_size, "zero_stage": ds.get("zero_optimization", {}).get("stage", 0)}

    # 4. resume: adapter, optimizer, schedule, data position, RNG
    start_step, nonfinite = 0, 0
    ckpt = find_checkpoint(cfg.resume, cfg.output_dir) if cfg.resume else None
    if ckpt is not None:
        client = load_checkpoint(engine, ckpt, layout_key)
        start_step, nonfinite = client["step"], client.get("nonfinite", 0)
        torch.set_rng_state(client["rng"])
        if is_main:
            print(f"resumed from {ckpt} at step {start_step}", flush=True)
    metrics = MetricsLog(cfg.output_dir, engine, start_step, is_main)
    groups = set_dist_timeout(cfg.dist_timeout)  # set-up is over: from here on a wait this long means a failure
    if is_main and groups:
        print(f"collective timeout {cfg.dist_timeout:g} s (--dist-timeout) on {groups} process groups", flush=True)

    def client_state(step: int) -> dict:
        return {
            "step": step,
            "samples": step * batches.global_batch,
            "nonfinite": nonfinite,
            "rng": torch.get_rng_state(),
            "layout": layout_key,
            "lora_config": cfg.lora_config().__dict__,
            "draft_meta": meta.__dict__,
        }

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not is_main, desc="train", dynamic_ncols=True)
    engine.train()
    device = engine.device
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        lr_used = scheduler.get_last_lr()[0] if scheduler is not None else None
        sums = _zero_sums(cfg.block_size)
        poisoned = 0  # micro-batches of this optimizer step whose loss was non-finite (on any rank)
        for epoch, indices in batches.micro_batches(step):
            # 5. one micro-step: blocks for each sequence, one forward over [clean | blocks], fused loss
            batch = collate_batch([dataset[i] for i in indices], pad_id)
            seeds = [sample_seed(cfg.seed, epoch, i) for i in indices]
            blocks = build_block_layout(batch["input_ids"], batch["loss_mask"], batch["attention_mask"], block_cfg, seeds)
            fault_for_tests("IN_STEP", step + 1)  # mid-step: the other ranks wait in the forward's collectives
            out = engine(batch["input_ids"].to(device), batch["attention_mask"].to(device), blocks.to(device))
            loss = _inject_nan_for_tests(step + 1, out.loss)
            if not _all_finite(loss):
                nonfinite += 1
                if is_main:
                    print(f"step {step + 1}: non-finite loss skipped ({nonfinite}/{cfg.max_nonfinite})", flush=True)
                if nonfinite >= cfg.max_nonfinite:
                    raise RuntimeError(f"aborting: {nonfinite} non-finite losses (--max-nonfinite {cfg.max_nonfinite})")
                # a zero loss with zero gradients keeps DeepSpeed's accumulation count; this micro-batch adds nothing
                loss = sum(p.sum() for p in lora_parameters(model)) * 0.0
                poisoned += 1
            engine.backward(loss)
            if poisoned == accum:
                # every micro-batch was skipped: AdamW would still move the weights along its momentum (and decay
                # them), so this optimizer step runs at lr 0; the scheduler sets the next step's lr as usual
                for group in engine.optimizer.param_groups:
                    group["lr"] = 0.0
            engine.step()
            _accumulate(sums, out, loss, batch, blocks)
        # 6. log the optimizer step
        record, per_position = _reduce_metrics(sums, layout, accum)
        record.update(
            step=step + 1,
            lr=lr_used,
            grad_norm=_float(engine.get_global_grad_norm()),
            tokens_per_s=record.pop("tokens") / max(time.perf_counter() - t0, 1e-9),
        )
        # 7. evaluate (real speculative decoding), log, checkpoint
        if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0:
            record.update(_periodic_eval(cfg, engine, tokenizer, meta))
        if (step + 1) % cfg.log_interval == 0 or step + 1 == total_steps or "eval_tau" in record:
            metrics.write(record, per_position)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}", tau=f"{record['sim_tau']:.2f}")
        if cfg.save_interval and (step + 1) % cfg.save_interval == 0 and step + 1 < total_steps:
            save_checkpoint(engine, Path(cfg.output_dir) / "checkpoints", step + 1, client_state(step + 1), cfg.keep_last)
        fault_for_tests("AFTER_STEP", step + 1)
    bar.close()

    # 8. final checkpoint and the exported adapter
    final = save_checkpoint(engine, Path(cfg.output_dir) / "checkpoints", total_steps, client_state(total_steps), cfg.keep_last)
    adapter_dir = Path(cfg.output_dir) / "adapter"
    if is_main:
        from .checkpoint import export_checkpoint

        export_checkpoint(final, adapter_dir)
        print(f"adapter exported to {adapter_dir}", flush=True)
    dist.barrier()
    return adapter_dir


def _inject_nan_for_tests(step: int, loss: torch.Tensor) -> torch.Tensor:
    """Tests of the non-finite guard poison the loss of one optimizer step."""
    if os.environ.get("DFLASH_DS_TEST_NAN_AT_STEP") == str(step):
        return loss * float("nan")
    return loss


def _zero_sums(block_size: int) -> dict[str, torch.Tensor]:
    z = torch.zeros
    return {
        "loss": z(()), "ce": z(()), "kl": z(()), "correct": z(block_size), "count": z(block_size),
        "accept_sum": z(()), "accept_count": z(()), "tokens": z(()),
    }


def _accumulate(sums, out, loss, batch, blocks) -> None:
    sums["loss"] += loss.detach().float().cpu()
    sums["ce"] += out.ce.float().cpu()
    sums["kl"] += out.kl.float().cpu()
    sums["correct"] += out.correct_by_pos.cpu()
    sums["count"] += out.count_by_pos.cpu()
    sums["accept_sum"] += out.accept_sum.cpu()
    sums["accept_count"] += out.accept_count.cpu()
    sums["tokens"] += float(batch["attention_mask"].sum() + blocks.block_valid.sum() * blocks.block_size)


def _reduce_metrics(sums, layout: ParallelLayout, accum: int) -> tuple[dict, list[float]]:
    """Sum over data-parallel ranks (TP ranks hold the same numbers) and turn sums into means."""
    flat = torch.cat([v.reshape(-1) for v in sums.values()])
    if layout.dp_size > 1:
        dist.all_reduce(flat, group=layout.dp_group)
    parts, offset = {}, 0
    for k, v in sums.items():
        parts[k] = flat[offset : offset + v.numel()].reshape(v.shape)
        offset += v.numel()
    micro_steps = accum * layout.dp_size
    per_position = (parts["correct"] / parts["count"].clamp(min=1)).tolist()
    record = {
        "loss": float(parts["loss"]) / micro_steps,
        "ce": float(parts["ce"]) / micro_steps,
        "kl": float(parts["kl"]) / micro_steps,
        "acc": float(parts["correct"].sum() / parts["count"].sum().clamp(min=1)),
        "sim_tau": float(parts["accept_sum"] / parts["accept_count"]) if parts["accept_count"] > 0 else float("nan"),
        "tokens": float(parts["tokens"]),
    }
    return record, per_position


def _all_finite(loss: torch.Tensor) -> bool:
    flag = torch.tensor([float(torch.isfinite(loss.detach()).all())], device="cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def _periodic_eval(cfg: TrainConfig, engine, tokenizer, meta: DraftMeta) -> dict:
    """Speculative decoding on held-out prompts with the in-memory model. Every rank runs it in lockstep (ZeRO-3
    and TP forwards are collective); greedy decoding keeps the ranks' control flow identical."""
    from .evaluate import load_prompts, run_eval

    model = engine.module.model
    was_training = model.training
    model.eval()
    prompts = load_prompts(cfg.eval_prompts, tokenizer, limit=cfg.eval_limit)
    loop = "fused" if meta.scope == "block" else "two_forward"
    report = run_eval(model, tokenizer, meta, prompts, max_new_tokens=cfg.eval_max_new_tokens, baselines="none",
                      loop=loop, repeats=1, progress=False)
    model.train(was_training)
    return {"eval_tau": report["tau"], "eval_speedup": report["speedup"]}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_train_args(argv)
    try:
        with exit_on_dist_failure("dflash-ds train"):  # another rank died or hangs: say so, exit 3
            train(cfg)
    except ValueError as exc:  # configuration errors: one clear line, no traceback
        print(f"dflash-ds train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
