"""Training flags as one typed dataclass, and the DeepSpeed JSON filled from them.

Every flag defaults to ``None`` where the ds_config may also set the value: a value given in both places must
agree, ``"auto"`` in the JSON is filled from the flag (or the documented default), and a contradiction is an error
raised before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .blocks import BlockConfig
from .checkpoint import find_checkpoint
from .data import DataConfig
from .evaluate import read_prompts
from .kinds import CLEAN_PASSES, KINDS, LORA, DFlashConfig, resolve_clean_pass
from .lora import LoRAConfig
from .loss import LossConfig
from .settings import REQUIRED, add_flags, check_choices, from_args, setting


LR_SCHEDULES = ("cosine", "linear", "constant")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


@dataclass
class DrafterConfig(DFlashConfig):
    """Drafter kind (:mod:`dflash_ds.kinds`): lora (the target + a gated LoRA adapter) or dflash (a standalone DFlash
    draft model, shaped by the inherited ``--draft-*`` settings)."""

    kind: str = setting(LORA, "lora: the target itself with a gated LoRA adapter (exported to OUTPUT/adapter); "
                        "dflash: a standalone DFlash draft model of a few layers reading the frozen target's hidden "
                        "states (exported to OUTPUT/drafter in the published SGLang/vLLM format)", flag="drafter",
                        choices=KINDS)

    def __post_init__(self) -> None:
        super().__post_init__()
        for flag, value in (("--draft-vocab", self.draft_vocab), ("--features", self.features)):
            if value is not None and self.kind != "dflash":
                raise ValueError(f"{flag} is a standalone-drafter flag: it needs --drafter dflash (this run trains "
                                 f"--drafter {self.kind})")


@dataclass
class OptimConfig:
    """Optimisation (values the ds_config may also set must agree with it)."""

    lr: float | None = setting(None, "peak learning rate (default 2e-4, or the ds_config's optimizer lr)")
    weight_decay: float | None = setting(None, "AdamW weight decay (default 0.0, or the ds_config's)")
    warmup_ratio: float = setting(0.04, "fraction of the steps spent warming up linearly")
    lr_schedule: str = setting("cosine", "learning-rate schedule after warm-up", choices=LR_SCHEDULES)
    grad_clip: float | None = setting(None, "gradient norm clip (default 1.0, or the ds_config's gradient_clipping)")
    epochs: int = setting(1, "passes over the data")
    max_steps: int | None = setting(None, "optimizer steps (overrides --epochs)")
    micro_batch_size: int | None = setting(None, "sequences per rank per micro-step (default 1)")
    grad_accum: int | None = setting(None, "micro-steps per optimizer step (default 1)")
    seed: int = setting(0, "seed of the data order, the anchors and noise, and the drafter's initialisation")
    group_by_length: int = setting(0, "sort each run of N global batches of the shuffled data by length, so the "
                                   "ranks of a step get similar lengths and none waits for another at the gradient "
                                   "all-reduce (and micro-batches carry little padding); 0: plain shuffled order",
                                   metavar="N")
    max_nonfinite: int = setting(10, "abort after this many skipped non-finite losses")

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.group_by_length < 0:
            raise ValueError(f"--group-by-length must be >= 0 (0: off), got {self.group_by_length}")


@dataclass(kw_only=True)
class TrainConfig:
    """``dflash-ds train``: the run's own settings, and one component config per concept. Every field is a flag
    (:mod:`dflash_ds.settings`)."""

    model_path: str = setting(REQUIRED, "target model directory (from_pretrained)")
    output_dir: str = setting(REQUIRED, "checkpoints, metrics.jsonl, TensorBoard and the exported drafter "
                              "(OUTPUT/adapter or OUTPUT/drafter)")
    deepspeed_config: str | None = setting(None, "ds_config JSON (default: ZeRO-2)", aliases=("deepspeed-config",),
                                           flag="deepspeed_config")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward (non-reentrant)")
    attn_implementation: str = setting("sdpa", "attention kernel; flex_attention skips fully masked tiles (GPU)",
                                       choices=ATTN_IMPLEMENTATIONS)
    clean_pass: str = setting("auto", "how the clean tokens run: cached (a no-grad forward into a KV cache the blocks "
                              "read: no backward through them; scope block, SDPA or eager), joint (one forward over "
                              "clean + blocks); auto: cached where it applies, else joint", choices=CLEAN_PASSES)
    dist_timeout: float = setting(1800.0, "a collective that waits longer for another rank fails the run with a "
                                  "clear message (a dead or hung rank); must exceed the slowest checkpoint save. "
                                  "Set-up waits max(this, 1800 s)", metavar="SECONDS")
    log_interval: int = setting(1, "write metrics every N optimizer steps")
    save_interval: int = setting(0, "checkpoint every N steps (0: only at the end)")
    keep_last: int = setting(2, "checkpoints kept")
    resume: str | None = setting(None, "'auto' (latest checkpoint in OUTPUT/checkpoints) or a checkpoint path")
    eval_interval: int = setting(0, "run speculative-decoding eval every N steps (0: never)")
    eval_prompts: str | None = setting(None, "JSONL prompts for --eval-interval")
    eval_max_new_tokens: int = setting(64, "tokens generated per prompt by the periodic eval")
    eval_limit: int = setting(8, "prompts used by the periodic eval")
    local_rank: int = setting(-1, None, aliases=("local-rank",), flag="local_rank")  # set by the deepspeed launcher
    blocks: BlockConfig = field(default_factory=BlockConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = setting(REQUIRED)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        """Cheap checks that need no model: fail before anything heavy starts. (Each component checked its own
        values when it was built.)"""
        if not Path(self.model_path).is_dir():
            raise ValueError(f"--model-path {self.model_path!r} is not a directory (a from_pretrained folder)")
        for path in self.data.paths:
            if not Path(path).is_file():
                raise ValueError(f"--train-data {path!r}: no such file")
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        resolve_clean_pass(self.clean_pass, self.lora.scope, self.attn_implementation)
        if self.eval_interval and not self.eval_prompts:
            raise ValueError("--eval-interval needs --eval-prompts")
        if self.eval_prompts:  # read now: a bad prompt file must not surface at the first evaluation, hours in
            try:
                read_prompts(self.eval_prompts)
            except FileNotFoundError as exc:
                raise ValueError(f"--eval-prompts {exc}") from None
        if self.resume not in (None, "auto"):
            find_checkpoint(self.resume, self.output_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflash-ds train",
        description="Train a one-step block-diffusion drafter (DeepSpeed): a LoRA adapter on the target model "
                    "(--drafter lora) or a standalone DFlash draft model (--drafter dflash).",
    )
    add_flags(parser, TrainConfig)
    return parser


def parse_train_args(argv: list[str] | None) -> TrainConfig:
    """Flags -> :class:`TrainConfig`. A value no component accepts raises ValueError naming its flag."""
    return from_args(TrainConfig, build_parser().parse_args(argv))


DEFAULT_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": "auto"},
    "tensorboard": {"enabled": True, "output_path": "auto", "job_name": "auto"},
}


def load_ds_config(path: str | None) -> dict:
    if path is None:
        return json.loads(json.dumps(DEFAULT_DS_CONFIG))
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"--deepspeed_config {path}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--deepspeed_config {path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc


def _fill(section: dict, key: str, flag_value, default, flag_name: str, where: str):
    """Resolve one value given possibly by both the flag and the JSON."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = default if flag_value is None else flag_value
    elif flag_value is not None and flag_value != current:
        raise ValueError(f"{flag_name}={flag_value} contradicts {where}={current} in the ds_config")
    return section[key]


def autotp_size(ds: dict) -> int:
    tp = ds.get("tensor_parallel", {}) or {}
    return int(tp.get("autotp_size", 1) or 1)


def resolve_ds_config(ds: dict, cfg: TrainConfig, dp_size: int, use_bf16: bool) -> dict:
    """Fill ``"auto"`` values from the flags and check that batch sizes add up. Returns the dict DeepSpeed gets
    (its ``tensor_parallel`` section removed: dflash-ds shards the model itself, see dflash_ds/lora/)."""
    ds = json.loads(json.dumps(ds))
    micro = _fill(ds, "train_micro_batch_size_per_gpu", cfg.optim.micro_batch_size, 1, "--micro-batch-size",
                  "train_micro_batch_size_per_gpu")
    gas = _fill(ds, "gradient_accumulation_steps", cfg.optim.grad_accum, 1, "--grad-accum", "gradient_accumulation_steps")
    _fill(ds, "gradient_clipping", cfg.optim.grad_clip, 1.0, "--grad-clip", "gradient_clipping")
    for name, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"ds_config {name} must be a positive integer, got {value!r}")
    expected = micro * gas * dp_size
    total = ds.get("train_batch_size", "auto")
    if total == "auto":
        ds["train_batch_size"] = expected
    elif total != expected:
        raise ValueError(
            f"ds_config train_batch_size={total} but train_micro_batch_size_per_gpu({micro}) x "
            f"gradient_accumulation_steps({gas}) x data-parallel ranks({dp_size}) = {expected}"
        )
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    _fill(params, "lr", cfg.optim.lr, 2e-4, "--lr", "optimizer.params.lr")
    _fill(params, "weight_decay", cfg.optim.weight_decay, 0.0, "--weight-decay", "optimizer.params.weight_decay")
    if "scheduler" in ds:
        raise ValueError("ds_config has a 'scheduler' section: remove it; the schedule comes from --lr-schedule/--warmup-ratio")
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled") == "auto":
            ds[key]["enabled"] = use_bf16 if key == "bf16" else False
    tb = ds.get("tensorboard")
    if tb is not None:
        if tb.get("output_path", "auto") == "auto":
            tb["output_path"] = os.path.join(cfg.output_dir, "tensorboard")
        if tb.get("job_name", "auto") == "auto":
            tb["job_name"] = "dflash"
    zero = ds.get("zero_optimization", {})
    for key, value in list(zero.items()):
        if value == "auto":
            raise ValueError(f"ds_config zero_optimization.{key} is 'auto': dflash-ds fills no ZeRO sizes; set a number")
    ds.pop("tensor_parallel", None)
    return ds
