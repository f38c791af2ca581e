"""The training recipe: ``deepspeed [--hostfile H] -m dflash_ds.train --deepspeed_config ds_configs/X.json ...``.

In named steps, as :func:`train` reads::

    run = setup(cfg)                       # flags + ds_config checked, data, frozen target + adapter, DeepSpeed, resume
    for step in range(run.start_step, run.total_steps):
        metrics = train_step(run, step)    # per micro-batch: blocks, one forward over [clean | blocks], fused loss
        maybe_eval(run, step, metrics)     # real speculative decoding on held-out prompts
        log(run, metrics)                  # metrics.jsonl, TensorBoard, progress bar
        maybe_save(run, step)              # crash-safe checkpoint
    finish(run)                            # final checkpoint, exported PEFT adapter
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from . import collectives
from .blocks import BlockConfig, BlockLayout, build_block_layout
from .collectives import process_group_backend
from .config import TrainConfig, autotp_size, load_ds_config, parse_train_args, resolve_ds_config
from .data import build_dataset, collate_batch, sequence_lengths
from .faults import faults
from .files import write_text_atomic
from .families import check_max_length, check_tp_compatible, family_of
from .lora import DraftMeta, apply_lora, lora_parameters
from .mask_token import resolve_mask_token
from .model import DFlashObjective, ObjectiveOutput
from .parallel import (
    ModelParallelUnit,
    ParallelLayout,
    build_parallel_layout,
    check_parallel_sizes,
    exit_on_dist_failure,
    set_dist_timeout,
    setup_timeout,
)



# ----------------------------------------------------------------------------------------------------------------
# set-up helpers


def accelerator_device_type() -> str:
    """The device type this process computes on: ``"cuda"`` where a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(dist_timeout: float) -> None:
    """Join the launcher's process group (deepspeed, torchrun) or make a group of one. Set-up collectives wait
    ``max(dist_timeout, SETUP_TIMEOUT_S)``; :func:`setup` tightens every group to ``dist_timeout`` before step 1.

    The group gets a backend for every device its tensors may be on (:func:`process_group_backend`: on a GPU,
    ``"cpu:gloo,cuda:nccl"``): some collectives here run on CPU tensors on purpose, and NCCL alone has no CPU
    backend. deepspeed.init_distributed passes the string to ``torch.distributed.init_process_group`` unchanged
    (deepspeed/comm/torch.py ``TorchBackend.init_process_group``), and ``new_group`` inherits it."""
    import deepspeed

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    device_type = accelerator_device_type()
    if device_type == "cuda":  # before the group exists: NCCL binds each rank to its current device
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=process_group_backend(device_type), auto_mpi_discovery=False,
                               timeout=setup_timeout(dist_timeout))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Per-example seed for anchors/noise: the same example gets the same blocks on any rank layout."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 12_345) % (2**62)


class StepBatches:
    """Deterministic global batches: step ``g`` of epoch ``e`` takes ``order_e[g*GB:(g+1)*GB]``; data-parallel rank
    ``r`` gets micro-batch ``i`` as the slice ``[(i*dp + r)*micro, +micro)`` of it. TP ranks share ``r``.

    ``order_e`` is a random permutation of the examples (seeded by ``seed + e``). With ``group_by_length = G > 0``
    and the examples' ``lengths``, each run of ``G`` global batches of it is then sorted by length, longest first:
    the ranks of one step (and the rows of one micro-batch) get neighbouring lengths, so no rank idles at the
    step's gradient all-reduce while another finishes a longer sequence, and micro-batches carry little padding.
    Which examples an epoch uses, and in which group, stays random."""

    def __init__(self, num_examples: int, micro: int, accum: int, dp_size: int, dp_rank: int, seed: int,
                 lengths: Sequence[int] | None = None, group_by_length: int = 0) -> None:
        self.n, self.micro, self.accum, self.dp, self.rank, self.seed = num_examples, micro, accum, dp_size, dp_rank, seed
        self.global_batch = micro * accum * dp_size
        self.steps_per_epoch = num_examples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the data has {num_examples} usable conversations, fewer than one global batch "
                f"({self.global_batch} = micro x accum x data-parallel ranks); add data or shrink the batch"
            )
        if group_by_length and (lengths is None or len(lengths) != num_examples):
            raise ValueError("group_by_length needs one length per example")
        self.lengths, self.group = (list(lengths) if group_by_length else None), group_by_length
        self._perm_epoch, self._perm = -1, None

    def epoch_order(self, epoch: int) -> list[int]:
        """Every example index once, in the order epoch ``epoch`` takes them (its last ``n % GB`` go unused)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if not self.group:
            return order
        used = self.steps_per_epoch * self.global_batch  # the tail is unused: keep it out of the groups
        span = self.group * self.global_batch
        grouped = []
        for start in range(0, used, span):
            grouped += sorted(order[start : min(start + span, used)], key=lambda i: -self.lengths[i])
        return grouped + order[used:]

    def micro_batches(self, step: int) -> list[tuple[int, list[int]]]:
        """``[(epoch, example indices)]`` for each micro-step of optimizer step ``step`` on this rank."""
        epoch, local = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = self.epoch_order(epoch), epoch
        base = local * self.global_batch
        out = []
        for i in range(self.accum):
            start = base + (i * self.dp + self.rank) * self.micro
            out.append((epoch, self._perm[start : start + self.micro]))
        return out


def exact_batch_flags(global_batch: int, micro: int, dp: int) -> str | None:
    """Flags that give ``global_batch`` sequences per step on ``dp`` data-parallel ranks, keeping the micro-batch
    where possible (else the largest one that divides); None when ``dp`` does not divide ``global_batch``."""
    if global_batch % dp:
        return None
    per_rank = global_batch // dp
    if per_rank % micro == 0:
        return f"--grad-accum {per_rank // micro} (ds_config gradient_accumulation_steps)"
    m = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
    return (f"--micro-batch-size {m} --grad-accum {per_rank // m} (ds_config train_micro_batch_size_per_gpu, "
            "gradient_accumulation_steps)")


def resume_step(saved: dict, micro: int, accum: int, dp: int, where: str) -> int:
    """The step a run resumed from a checkpoint with client state ``saved`` starts at: the saved step, where this
    run's global batch (``micro x accum x dp``) is the one the checkpoint was trained with.

    A step is a global batch of the data order, and ``--max-steps``/``--epochs``, the schedule and the saved
    scheduler count steps: with another global batch the same step would start at another sample (some data
    skipped or seen twice) and the schedule would stretch or shrink. That is refused with the flags that resume
    exactly (``saved["samples"]`` is the position in sequences)."""
    step, samples = int(saved["step"]), saved.get("samples")
    global_batch = micro * accum * dp
    if samples is None or step == 0 or samples == step * global_batch:
        return step
    saved_batch = samples // step
    fix = exact_batch_flags(saved_batch, micro, dp)
    how = (f"resume with {fix} to continue exactly at sample {samples}" if fix else
           f"resume on a number of data-parallel ranks that divides {saved_batch}")
    raise ValueError(
        f"--resume {where}: the checkpoint is at step {step} of global batch {saved_batch} (sequence {samples} of "
        f"the data order); this run's global batch is {global_batch} (micro-batch {micro} x grad-accum {accum} x "
        f"{dp} data-parallel ranks), so it would restart at sequence {step * global_batch} and count "
        f"--max-steps/--epochs and the learning-rate schedule in other steps; {how}"
    )


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


def load_target(cfg: TrainConfig, ds: dict, parallel: ParallelLayout, dtype: torch.dtype):
    """The frozen target, partitioned at load time under ZeRO-3 (without TP), fitted with the adapter."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds.get("zero_optimization", {}).get("stage", 0) == 3
    keep_alive = None
    if zero3 and parallel.tp.size == 1:
        keep_alive = HfDeepSpeedConfig(ds)  # must stay referenced until from_pretrained returns
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype, attn_implementation=cfg.attn_implementation)
    del keep_alive
    apply_lora(model, cfg.lora, tp=parallel.tp, seed=cfg.optim.seed)
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
        write_text_atomic(self.path, "".join(l + "\n" for l in keep))

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
# step metrics: summed over micro-batches and data-parallel ranks, then turned into means, in one place


class StepMetrics:
    """What one optimizer step logs. Sums and counts while the micro-batches run (so ranks can add them up), then
    :meth:`reduce` gives the record: loss, ce, kl (means over the micro-batches that counted), acc (top-1 over
    supervised block positions), sim_tau (simulated acceptance over fully supervised blocks), tokens_per_s,
    skipped_samples (samples with no valid anchor), nonfinite_micro_batches, and the accuracy by block position for
    TensorBoard.

    A micro-batch whose loss was non-finite (skipped: it added no gradient) adds nothing to the loss, ce, kl and
    accuracy sums: its NaN would make the step's means NaN, and its zero stand-in loss would pull them down. It
    still counts in tokens_per_s (its forward ran). A step with no micro-batch left logs NaN means."""

    def __init__(self, step: int, block_size: int) -> None:
        self.step, self.t0 = step, time.perf_counter()
        z = torch.zeros
        self.sums = {
            "loss": z(()), "ce": z(()), "kl": z(()), "correct": z(block_size), "count": z(block_size),
            "accept_sum": z(()), "accept_count": z(()), "tokens": z(()), "skipped_samples": z(()),
            "counted": z(()), "nonfinite": z(()),
        }
        self.record: dict[str, Any] = {}
        self.per_position: list[float] = []

    def add(self, out: ObjectiveOutput, loss: torch.Tensor, batch: dict, blocks: BlockLayout, *,
            skipped: bool = False) -> None:
        """One micro-batch's numbers; ``skipped``: its loss was non-finite on some rank (see the class docstring)."""
        s = self.sums
        s["tokens"] += float(batch["attention_mask"].sum() + blocks.block_valid.sum() * blocks.block_size)
        if skipped:
            s["nonfinite"] += 1
            return
        s["counted"] += 1
        s["loss"] += loss.detach().float().cpu()
        s["ce"] += out.ce.float().cpu()
        s["kl"] += out.kl.float().cpu()
        s["correct"] += out.correct_by_pos.cpu()
        s["count"] += out.count_by_pos.cpu()
        s["accept_sum"] += out.accept_sum.cpu()
        s["accept_count"] += out.accept_count.cpu()
        s["skipped_samples"] += blocks.num_skipped

    def reduce(self, parallel: ParallelLayout, accum: int, **extra) -> dict[str, Any]:
        """Sum over data-parallel ranks (TP ranks hold the same numbers) and turn sums into means (collective).
        ``accum``: the micro-batches each rank ran this step (counted or skipped)."""
        flat = torch.cat([v.reshape(-1) for v in self.sums.values()])
        if parallel.dp_size > 1:
            collectives.all_reduce(flat, group=parallel.dp_group)  # CPU sums: the group's gloo backend
        parts, offset = {}, 0
        for k, v in self.sums.items():
            parts[k] = flat[offset : offset + v.numel()].reshape(v.shape)
            offset += v.numel()
        counted = float(parts["counted"])  # micro-batches over all data-parallel ranks
        if counted + float(parts["nonfinite"]) != accum * parallel.dp_size:
            raise RuntimeError(f"step {self.step}: {counted:g} counted + {float(parts['nonfinite']):g} skipped "
                               f"micro-batches, expected {accum} on each of {parallel.dp_size} ranks")
        mean = (lambda key: float(parts[key]) / counted) if counted else (lambda key: float("nan"))
        self.per_position = (parts["correct"] / parts["count"].clamp(min=1)).tolist()
        accepted = parts["accept_count"] > 0
        self.record = {
            "step": self.step,
            "loss": mean("loss"),
            "ce": mean("ce"),
            "kl": mean("kl"),
            "acc": float(parts["correct"].sum() / parts["count"].sum().clamp(min=1)) if counted else float("nan"),
            "sim_tau": float(parts["accept_sum"] / parts["accept_count"]) if accepted else float("nan"),
            "skipped_samples": int(parts["skipped_samples"]),
            # every rank skips the same micro-batches: count each once
            "nonfinite_micro_batches": int(parts["nonfinite"]) // parallel.dp_size,
            **extra,
            "tokens_per_s": float(parts["tokens"]) / max(time.perf_counter() - self.t0, 1e-9),
        }
        return self.record


# ----------------------------------------------------------------------------------------------------------------
# the recipe


@dataclass
class Run:
    """Everything :func:`setup` builds and the loop uses. ``engine`` is DeepSpeed's; ``model`` the Hugging Face
    model with the adapter inside it; ``blocks`` the block config with its MASK id resolved."""

    cfg: TrainConfig
    parallel: ParallelLayout
    engine: Any
    model: Any
    tokenizer: Any
    dataset: Any
    batches: StepBatches
    blocks: BlockConfig
    meta: DraftMeta
    pad_id: int
    total_steps: int
    start_step: int = 0
    nonfinite: int = 0
    layout_key: dict = field(default_factory=dict)
    metrics_log: MetricsLog | None = None
    bar: Any = None

    @property
    def is_main(self) -> bool:
        return self.parallel.rank == 0

    def client_state(self, step: int) -> dict:
        """The rank-independent state a checkpoint carries besides DeepSpeed's own files."""
        return {
            "step": step,
            "samples": step * self.batches.global_batch,
            "nonfinite": self.nonfinite,
            "rng": torch.get_rng_state(),
            "layout": self.layout_key,
            "lora_config": self.cfg.lora.__dict__,
            "draft_meta": self.meta.__dict__,
        }


def setup(cfg: TrainConfig) -> Run:
    """Check everything that can be wrong before any model loads, then build the run: process groups, data, the
    frozen target with its adapter, DeepSpeed, and the state of a resumed run."""
    import deepspeed
    from transformers import AutoConfig, AutoTokenizer

    from .checkpoint import find_checkpoint, load_checkpoint, read_client_state

    cfg.validate()
    ds_raw = load_ds_config(cfg.deepspeed_config)
    tp_size = autotp_size(ds_raw)
    model_config = AutoConfig.from_pretrained(cfg.model_path)
    family_of(model_config)  # an unsupported architecture fails here, naming the supported ones
    check_tp_compatible(model_config, tp_size)
    check_max_length(model_config, cfg.data.max_length)
    init_distributed(cfg.dist_timeout)
    check_parallel_sizes(dist.get_world_size(), tp_size)
    parallel = build_parallel_layout(tp_size)
    ds = resolve_ds_config(ds_raw, cfg, parallel.dp_size, use_bf16=torch.cuda.is_available())
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
    is_main = parallel.rank == 0
    torch.manual_seed(cfg.optim.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)

    # data: rank 0 tokenises into the cache first, the others then read it
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    mask = resolve_mask_token(tokenizer, model_config.vocab_size, cfg.blocks.mask_token_id)
    if is_main:
        print(f"MASK token: id {mask.token_id} ({mask.token!r}, rule: {mask.rule})", flush=True)
    data_cfg = replace(cfg.data, cache_dir=str(Path(cfg.output_dir) / "data_cache"))
    if is_main:
        dataset = build_dataset(tokenizer, data_cfg)
    dist.barrier()
    if not is_main:
        dataset = build_dataset(tokenizer, data_cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    batches = StepBatches(len(dataset), micro, accum, parallel.dp_size, parallel.dp_rank, cfg.optim.seed,
                          sequence_lengths(dataset) if cfg.optim.group_by_length else None,
                          cfg.optim.group_by_length)
    total_steps = cfg.optim.max_steps or batches.steps_per_epoch * cfg.optim.epochs
    # resume: the data position must mean the same sample in this layout (checked before any model loads)
    ckpt = find_checkpoint(cfg.resume, cfg.output_dir) if cfg.resume else None
    if ckpt is not None:
        resume_step(read_client_state(ckpt), micro, accum, parallel.dp_size, str(ckpt))

    # model: frozen target + adapter, wrapped in the objective, handed to DeepSpeed
    model = load_target(cfg, ds, parallel, dtype)
    objective = DFlashObjective(model, cfg.loss, cfg.lora.scope, cfg.clean_pass)
    lm_head_weight = model.get_output_embeddings().weight
    if hasattr(lm_head_weight, "ds_id"):  # ZeRO-3: gather lm_head for the loss module's forward only
        deepspeed.zero.register_external_parameter(objective.loss_head, lm_head_weight)
    schedule = lr_lambda(total_steps, cfg.optim.warmup_ratio, cfg.optim.lr_schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        model_parameters=[{"params": lora_parameters(model)}],
        config=ds,
        mpu=ModelParallelUnit(parallel) if tp_size > 1 else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    run = Run(
        cfg=cfg, parallel=parallel, engine=engine, model=model, tokenizer=tokenizer, dataset=dataset, batches=batches,
        blocks=replace(cfg.blocks, mask_token_id=mask.token_id), pad_id=pad_id, total_steps=total_steps,
        meta=DraftMeta(block_size=cfg.blocks.block_size, mask_token_id=mask.token_id, scope=cfg.lora.scope,
                       base_model=cfg.model_path, mask_token=mask.token, mask_token_rule=mask.rule),
        layout_key={"world_size": parallel.world_size, "tp": tp_size,
                    "zero_stage": ds.get("zero_optimization", {}).get("stage", 0)},
    )

    # resume: adapter, optimizer, schedule, data position, RNG
    if ckpt is not None:
        client = load_checkpoint(engine, ckpt, run.layout_key)
        run.start_step = resume_step(client, micro, accum, parallel.dp_size, str(ckpt))
        run.nonfinite = client.get("nonfinite", 0)
        torch.set_rng_state(client["rng"])
        if is_main:
            print(f"resumed from {ckpt} at step {run.start_step}", flush=True)
    run.metrics_log = MetricsLog(cfg.output_dir, engine, run.start_step, is_main)
    groups = set_dist_timeout(cfg.dist_timeout)  # set-up is over: from here on a wait this long means a failure
    if is_main and groups:
        print(f"collective timeout {cfg.dist_timeout:g} s (--dist-timeout) on {groups} process groups", flush=True)
    from tqdm import tqdm

    run.bar = tqdm(total=total_steps, initial=run.start_step, disable=not is_main, desc="train", dynamic_ncols=True)
    engine.train()
    return run


def train_step(run: Run, step: int) -> StepMetrics:
    """Optimizer step ``step`` (0-based): for each micro-batch, blocks for every sequence, one forward over
    ``[clean | blocks]`` with the fused loss, DeepSpeed's backward and step. A micro-batch whose loss is non-finite
    on any rank adds a zero gradient and is counted; the run aborts past ``--max-nonfinite``."""
    engine, cfg, device = run.engine, run.cfg, run.engine.device
    lr_used = engine.lr_scheduler.get_last_lr()[0] if engine.lr_scheduler is not None else None
    metrics = StepMetrics(step + 1, run.blocks.block_size)
    micro_batches = run.batches.micro_batches(step)
    poisoned = 0  # micro-batches of this optimizer step whose loss was non-finite (on any rank)
    faults.at("IN_STEP", step + 1)  # tests: the other ranks then wait in this step's collectives
    for epoch, indices in micro_batches:
        batch = collate_batch([run.dataset[i] for i in indices], run.pad_id)
        seeds = [sample_seed(cfg.optim.seed, epoch, i) for i in indices]
        blocks = build_block_layout(batch["input_ids"], batch["loss_mask"], batch["attention_mask"], run.blocks, seeds)
        out = engine(batch["input_ids"].to(device), batch["attention_mask"].to(device), blocks.to(device))
        loss = faults.loss(step + 1, out.loss)
        skipped = not _all_finite(loss)  # the same on every rank
        if skipped:
            run.nonfinite += 1
            if run.is_main:
                print(f"step {step + 1}: non-finite loss skipped ({run.nonfinite}/{cfg.optim.max_nonfinite})", flush=True)
            if run.nonfinite >= cfg.optim.max_nonfinite:
                raise RuntimeError(f"aborting: {run.nonfinite} non-finite losses (--max-nonfinite {cfg.optim.max_nonfinite})")
            # a zero loss with zero gradients keeps DeepSpeed's accumulation count; this micro-batch adds nothing
            loss = sum(p.sum() for p in lora_parameters(run.model)) * 0.0
            poisoned += 1
        engine.backward(loss)
        if poisoned == len(micro_batches):
            # every micro-batch was skipped: AdamW would still move the weights along its momentum (and decay
            # them), so this optimizer step runs at lr 0; the scheduler sets the next step's lr as usual
            for group in engine.optimizer.param_groups:
                group["lr"] = 0.0
        engine.step()
        metrics.add(out, loss, batch, blocks, skipped=skipped)
    metrics.reduce(run.parallel, len(micro_batches), lr=lr_used, grad_norm=_float(engine.get_global_grad_norm()))
    return metrics


def maybe_eval(run: Run, step: int, metrics: StepMetrics) -> None:
    """Every ``--eval-interval`` steps: speculative decoding on held-out prompts with the in-memory model, its tau
    and speedup added to the step's record. Every rank runs it in lockstep (ZeRO-3 and TP forwards are collective);
    greedy decoding keeps the ranks' control flow identical."""
    cfg = run.cfg
    if not cfg.eval_interval or (step + 1) % cfg.eval_interval:
        return
    from .evaluate import EvalConfig, load_prompts, run_eval

    model = run.model
    was_training = model.training
    model.eval()
    prompts = load_prompts(cfg.eval_prompts, run.tokenizer, limit=cfg.eval_limit)
    settings = EvalConfig(max_new_tokens=cfg.eval_max_new_tokens, baselines="none", repeats=1,
                          loop="fused" if run.meta.scope == "block" else "two_forward")
    report = run_eval(model, run.tokenizer, run.meta, prompts, settings, progress=False)
    model.train(was_training)
    metrics.record.update(eval_tau=report["tau"], eval_speedup=report["speedup"])


def log(run: Run, metrics: StepMetrics) -> None:
    """metrics.jsonl and TensorBoard every ``--log-interval`` steps (and at the last step and every eval); the
    progress bar every step."""
    record, step = metrics.record, metrics.step
    if step % run.cfg.log_interval == 0 or step == run.total_steps or "eval_tau" in record:
        run.metrics_log.write(record, metrics.per_position)
    run.bar.update(1)
    run.bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}", tau=f"{record['sim_tau']:.2f}")


def maybe_save(run: Run, step: int) -> None:
    """A crash-safe checkpoint every ``--save-interval`` steps (the last step's is written by :func:`finish`)."""
    from .checkpoint import save_checkpoint

    done = step + 1
    if run.cfg.save_interval and done % run.cfg.save_interval == 0 and done < run.total_steps:
        save_checkpoint(run.engine, Path(run.cfg.output_dir) / "checkpoints", done, run.client_state(done),
                        run.cfg.keep_last)
    faults.at("AFTER_STEP", done)


def finish(run: Run) -> Path:
    """The final checkpoint and the exported PEFT adapter (``OUTPUT/adapter``)."""
    from .checkpoint import export_checkpoint, save_checkpoint

    run.bar.close()
    final = save_checkpoint(run.engine, Path(run.cfg.output_dir) / "checkpoints", run.total_steps,
                            run.client_state(run.total_steps), run.cfg.keep_last)
    adapter_dir = Path(run.cfg.output_dir) / "adapter"
    if run.is_main:
        export_checkpoint(final, adapter_dir)
        print(f"adapter exported to {adapter_dir}", flush=True)
    dist.barrier()
    return adapter_dir


def train(cfg: TrainConfig) -> Path:
    """The whole recipe; returns the exported adapter directory."""
    run = setup(cfg)
    for step in range(run.start_step, run.total_steps):
        metrics = train_step(run, step)
        maybe_eval(run, step, metrics)
        log(run, metrics)
        maybe_save(run, step)
    return finish(run)


def _all_finite(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every rank (collective): one rank's NaN makes every rank skip the micro-batch."""
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)  # on the loss's device
    if dist.is_initialized() and dist.get_world_size() > 1:
        collectives.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_train_args(argv)
        with exit_on_dist_failure("dflash-ds train"):  # another rank died or hangs: say so, exit 3
            train(cfg)
    except ValueError as exc:  # configuration errors: one clear line, no traceback
        print(f"dflash-ds train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
