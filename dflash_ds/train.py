"""The training recipe: ``deepspeed [--hostfile H] -m dflash_ds.train --deepspeed_config ds_configs/X.json ...``.

In named steps, as :func:`train` reads::

    run = setup(cfg)                       # flags + ds_config checked, data, frozen target + drafter, DeepSpeed, resume
    for step in range(run.start_step, run.total_steps):
        metrics = train_step(run, step)    # per micro-batch: blocks, the drafter's forward, fused loss
        maybe_eval(run, step, metrics)     # real speculative decoding on held-out prompts
        log(run, metrics)                  # metrics.jsonl, TensorBoard, progress bar
        maybe_save(run, step)              # crash-safe checkpoint
    finish(run)                            # final checkpoint, exported drafter

What the drafter is (``--drafter lora``: the target + a gated LoRA adapter; ``--drafter dflash``: a standalone DFlash
draft model) is behind :mod:`dflash_ds.kinds`; everything here is shared by both kinds.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import collectives
from .blocks import BlockConfig, build_block_layout
from .collectives import process_group_backend
from .checkpoint import export_checkpoint, find_checkpoint, load_checkpoint, read_client_state, save_checkpoint
from .config import TrainConfig, autotp_size, load_ds_config, parse_train_args, resolve_ds_config
from .data import build_dataset, collate_batch, sequence_lengths
from .evaluate import EvalConfig, load_prompts, run_eval
from .kinds import DraftKind, build_objective, check_resume, draft_kind, kind_class
from .faults import faults
from .families import check_max_length, check_tp_compatible, family_of
from .mask_token import resolve_mask_token
from .metrics import MetricsLog, StepMetrics
from .parallel import (
    ModelParallelUnit,
    ParallelLayout,
    build_parallel_layout,
    check_parallel_sizes,
    exit_on_dist_failure,
    set_dist_timeout,
    setup_timeout,
)
from .sampler import StepBatches, lr_lambda, resume_step, sample_seed



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
    unlink_shm_allreduce_buffer(device_type)


def unlink_shm_allreduce_buffer(device_type: str) -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer.

    On the CPU accelerator with every rank on one machine (``LOCAL_SIZE`` = world size, as the deepspeed launcher
    sets it), ``deepspeed.init_distributed`` creates ``/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}``
    (69 MB) and never unlinks it (deepspeed/ops/csrc/cpu/comm/shm.cpp): each run left them in RAM-backed /dev/shm,
    16 GB over a day of runs here, until vLLM could not reserve its memory. Every rank maps every rank's buffer inside
    ``init_distributed``, so once all ranks are past it the names can go; the mappings live on until exit, and a
    rank killed later leaves nothing behind either."""
    world = int(os.environ["WORLD_SIZE"])
    if device_type != "cpu" or os.environ.get("LOCAL_SIZE") != str(world):
        return
    if world > 1:
        torch.distributed.barrier()  # every rank has mapped every buffer
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(os.getuid(), os.environ["MASTER_ADDR"],
                                                           os.environ["MASTER_PORT"], os.environ["RANK"])
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def load_target(cfg: TrainConfig, ds: dict, parallel: ParallelLayout, dtype: torch.dtype):
    """The target as loaded, partitioned at load time under ZeRO-3 (without TP); the drafter kind then freezes and
    shards it and fits its drafter (:func:`dflash_ds.kinds.build_objective`)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds.get("zero_optimization", {}).get("stage", 0) == 3
    keep_alive = None
    if zero3 and parallel.tp.size == 1:
        keep_alive = HfDeepSpeedConfig(ds)  # must stay referenced until from_pretrained returns
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype, attn_implementation=cfg.attn_implementation)
    del keep_alive
    return model


# ----------------------------------------------------------------------------------------------------------------
# the recipe


@dataclass
class Run:
    """Everything :func:`setup` builds and the loop uses. ``engine`` is DeepSpeed's (its module the kind's
    objective); ``model`` the Hugging Face target (with the adapter inside it for the LoRA kind); ``kind`` the
    drafter kind around the objective; ``meta`` its drafting metadata; ``blocks`` the block config with its MASK id
    resolved."""

    cfg: TrainConfig
    parallel: ParallelLayout
    engine: Any
    model: Any
    tokenizer: Any
    dataset: Any
    batches: StepBatches
    blocks: BlockConfig
    kind: DraftKind
    meta: Any
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
            **type(self.kind).client_state(self.cfg, self.meta),
        }


def setup(cfg: TrainConfig) -> Run:
    """Check everything that can be wrong before any model loads, then build the run: process groups, data, the
    frozen target with its drafter, DeepSpeed, and the state of a resumed run."""
    import deepspeed
    from transformers import AutoConfig, AutoTokenizer

    cfg.validate()
    ds_raw = load_ds_config(cfg.deepspeed_config)
    tp_size = autotp_size(ds_raw)
    model_config = AutoConfig.from_pretrained(cfg.model_path)
    family_of(model_config)  # an unsupported architecture fails here, naming the supported ones
    check_tp_compatible(model_config, tp_size)
    check_max_length(model_config, cfg.data.max_length)
    kind_class(cfg.drafter.kind).check_target(cfg, model_config)  # e.g. the draft layers fit this target
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
    mask = resolve_mask_token(tokenizer, model_config.vocab_size, cfg.blocks.mask_token_id,
                              allow_ordinary=cfg.blocks.allow_ordinary_mask_token)
    if is_main:
        print(f"MASK token: id {mask.token_id} ({mask.token!r}, rule: {mask.rule})", flush=True)
    data_cfg = replace(cfg.data, cache_dir=str(Path(cfg.output_dir) / "data_cache"))
    if is_main:
        dataset = build_dataset(tokenizer, data_cfg, mask_token_id=mask.token_id)
        kind_class(cfg.drafter.kind).prepare_data(cfg, dataset, tokenizer, model_config)  # e.g. a draft vocabulary
    dist.barrier()
    if not is_main:
        dataset = build_dataset(tokenizer, data_cfg, mask_token_id=mask.token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    batches = StepBatches(len(dataset), micro, accum, parallel.dp_size, parallel.dp_rank, cfg.optim.seed,
                          sequence_lengths(dataset) if cfg.optim.group_by_length else None,
                          cfg.optim.group_by_length)
    total_steps = cfg.optim.max_steps or batches.steps_per_epoch * cfg.optim.epochs
    # resume: the data position must mean the same sample in this layout (checked before any model loads)
    ckpt = find_checkpoint(cfg.resume, cfg.output_dir) if cfg.resume else None
    if ckpt is not None:
        saved = read_client_state(ckpt)
        check_resume(saved, cfg, model_config, str(ckpt))  # the same drafter kind and shape
        resume_step(saved, micro, accum, parallel.dp_size, str(ckpt))

    # model: the frozen target and the kind's drafter, wrapped in its objective, handed to DeepSpeed
    model = load_target(cfg, ds, parallel, dtype)
    objective, meta = build_objective(cfg, model, parallel, mask, dtype)
    kind = draft_kind(objective)
    schedule = lr_lambda(total_steps, cfg.optim.warmup_ratio, cfg.optim.lr_schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        model_parameters=[{"params": kind.trainable_parameters()}],
        config=ds,
        mpu=ModelParallelUnit(parallel) if tp_size > 1 else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    run = Run(
        cfg=cfg, parallel=parallel, engine=engine, model=model, tokenizer=tokenizer, dataset=dataset, batches=batches,
        blocks=replace(cfg.blocks, mask_token_id=mask.token_id), pad_id=pad_id, total_steps=total_steps,
        kind=kind, meta=meta,
        layout_key={"world_size": parallel.world_size, "tp": tp_size,
                    "zero_stage": ds.get("zero_optimization", {}).get("stage", 0)},
    )

    # resume: drafter, optimizer, schedule, data position, RNG
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
    """Optimizer step ``step`` (0-based): for each micro-batch, blocks for every sequence, the kind's objective
    (the target and the drafter's forward) with the fused loss, DeepSpeed's backward and step. A micro-batch whose loss is non-finite
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
        out = engine(batch["input_ids"].to(device), batch["attention_mask"].to(device), blocks.to(device),
                     examples=list(indices))
        loss = faults.loss(step + 1, out.loss)
        skipped = not _all_finite(loss)  # the same on every rank
        if skipped:
            run.nonfinite += 1
            if run.is_main:
                print(f"step {step + 1}: non-finite loss skipped ({run.nonfinite}/{cfg.optim.max_nonfinite})", flush=True)
            if run.nonfinite >= cfg.optim.max_nonfinite:
                raise RuntimeError(f"aborting: {run.nonfinite} non-finite losses (--max-nonfinite {cfg.optim.max_nonfinite})")
            # a zero loss with zero gradients keeps DeepSpeed's accumulation count; this micro-batch adds nothing
            loss = sum(p.sum() for p in run.kind.trainable_parameters()) * 0.0
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
    """Every ``--eval-interval`` steps: speculative decoding on held-out prompts with the in-memory drafter, its tau
    and speedup added to the step's record. Every rank runs it in lockstep (ZeRO-3 and TP forwards are collective);
    greedy decoding keeps the ranks' control flow identical. Either kind decodes in memory: the LoRA kind with the
    adapter on ``run.model``, the standalone kind with its draft model (the kind's ``eval_drafter``)."""
    cfg = run.cfg
    if not cfg.eval_interval or (step + 1) % cfg.eval_interval:
        return
    drafter = run.kind.eval_drafter(run.meta)
    modules = [m for m in (run.model, drafter.model) if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    prompts = load_prompts(cfg.eval_prompts, run.tokenizer, limit=cfg.eval_limit)
    settings = EvalConfig(max_new_tokens=cfg.eval_max_new_tokens, baselines="none", repeats=1,
                          loop="fused" if run.meta.scope == "block" else "two_forward")
    try:
        report = run_eval(run.model, run.tokenizer, drafter, prompts, settings, progress=False)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
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
    done = step + 1
    if run.cfg.save_interval and done % run.cfg.save_interval == 0 and done < run.total_steps:
        save_checkpoint(run.engine, Path(run.cfg.output_dir) / "checkpoints", done, run.client_state(done),
                        run.cfg.keep_last)
    faults.at("AFTER_STEP", done)


def finish(run: Run) -> Path:
    """The final checkpoint and the exported drafter: ``OUTPUT/adapter`` (LoRA kind: a PEFT adapter directory +
    ``dflash.json``) or ``OUTPUT/drafter`` (dflash kind: ``config.json`` + ``model.safetensors``, the published
    format)."""
    run.bar.close()
    final = save_checkpoint(run.engine, Path(run.cfg.output_dir) / "checkpoints", run.total_steps,
                            run.client_state(run.total_steps), run.cfg.keep_last)
    out = Path(run.cfg.output_dir) / run.kind.artifact_dir
    if run.is_main:
        export_checkpoint(final, out)
        print(f"{run.kind.artifact_dir} exported to {out}", flush=True)
    dist.barrier()
    return out


def train(cfg: TrainConfig) -> Path:
    """The whole recipe; returns the exported drafter's directory (``OUTPUT/adapter`` or ``OUTPUT/drafter``)."""
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
