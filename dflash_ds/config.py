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
from .lora import DEFAULT_TARGETS, LoRAConfig
from .loss import LossConfig


@dataclass
class TrainConfig:
    model_path: str
    train_data: list[str]
    output_dir: str
    deepspeed_config: str | None = None
    # objective
    block_size: int = 16
    num_anchors: int | None = None
    anchors: str = "random"
    context_ratio: tuple[float, float] = (0.0, 0.0)
    noise_min: float | None = None
    gamma: float | None = 7.0
    mask_token_id: int | None = None
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    kl_type: str = "forward"
    kl_temperature: float = 1.0
    loss_chunk_size: int = 512
    # adapter
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_scope: str = "block"
    # optimisation
    lr: float | None = None  # default 2e-4
    weight_decay: float | None = None  # default 0.0
    warmup_ratio: float = 0.04
    lr_schedule: str = "cosine"
    grad_clip: float | None = None  # default 1.0
    epochs: int = 1
    max_steps: int | None = None
    micro_batch_size: int | None = None  # default 1
    grad_accum: int | None = None  # default 1
    max_length: int = 2048
    seed: int = 0
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    max_nonfinite: int = 10
    dist_timeout: float = 1800.0  # seconds a collective may wait for the other ranks (see parallel.py)
    # data
    bad_lines: str = "skip"
    truncated: str = "keep"
    num_proc: int = 1
    # bookkeeping
    log_interval: int = 1
    save_interval: int = 0
    keep_last: int = 2
    resume: str | None = None
    eval_interval: int = 0
    eval_prompts: str | None = None
    eval_max_new_tokens: int = 64
    eval_limit: int = 8
    local_rank: int = field(default=-1, repr=False)

    def block_config(self, mask_token_id: int) -> BlockConfig:
        return BlockConfig(
            block_size=self.block_size,
            num_anchors=self.num_anchors,
            anchor_strategy=self.anchors,
            context_ratio=self.context_ratio,
            noise_min=self.noise_min,
            gamma=self.gamma,
            mask_token_id=mask_token_id,
        )

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=tuple(self.lora_targets),
            scope=self.lora_scope,
        )

    def loss_config(self) -> LossConfig:
        return LossConfig(
            ce_weight=self.ce_weight,
            kl_weight=self.kl_weight,
            kl_type=self.kl_type,
            temperature=self.kl_temperature,
            chunk_size=self.loss_chunk_size,
        )

    def validate(self) -> None:
        """Cheap checks that need no model: fail before anything heavy starts."""
        self.block_config(mask_token_id=0)
        self.lora_config()
        self.loss_config()
        if not Path(self.model_path).is_dir():
            raise ValueError(f"--model-path {self.model_path!r} is not a directory (a from_pretrained folder)")
        for path in self.train_data:
            if not Path(path).is_file():
                raise ValueError(f"--train-data {path!r}: no such file")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"--lr-schedule must be cosine, linear or constant, got {self.lr_schedule!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.eval_interval and not self.eval_prompts:
            raise ValueError("--eval-interval needs --eval-prompts")
        if self.eval_prompts:  # read now: a bad prompt file must not surface at the first evaluation, hours in
            from .evaluate import read_prompts

            try:
                read_prompts(self.eval_prompts)
            except FileNotFoundError as exc:
                raise ValueError(f"--eval-prompts {exc}") from None
        if self.resume not in (None, "auto"):
            from .checkpoint import find_checkpoint

            find_checkpoint(self.resume, self.output_dir)


def _pair(text: str) -> tuple[float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}")
    return parts[0], parts[1]


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dflash-ds train",
        description="Train a one-step block-diffusion drafter as a LoRA adapter on the target model (DeepSpeed).",
    )
    a = p.add_argument
    a("--model-path", required=True, help="target model directory (from_pretrained)")
    a("--train-data", required=True, nargs="+", help="JSONL conversation file(s)")
    a("--output-dir", required=True)
    a("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", help="ds_config JSON (default: ZeRO-2)")
    a("--block-size", type=int, default=16)
    a("--num-anchors", type=int, default=None, help="blocks per sequence (default: S // block size)")
    a("--anchors", default="random", choices=["random", "tile"])
    a("--context-ratio", type=_pair, default=(0.0, 0.0), help="LO,HI: anchors start at floor(r*S), r~U[LO,HI]")
    a("--noise-min", type=_optional_float, default=None, help="noise schedule lower bound; none = one-step")
    a("--gamma", type=_optional_float, default=7.0, help="loss decay exp(-(k-1)/gamma); none = uniform")
    a("--mask-token-id", type=int, default=None,
      help="MASK id (default: <|mask|>, else an unused embedding row, else an unused special token; dflash.json "
           "records which)")
    a("--ce-weight", type=float, default=1.0)
    a("--kl-weight", type=float, default=1.0)
    a("--kl-type", default="forward", choices=["forward", "reverse", "tvd"])
    a("--kl-temperature", type=float, default=1.0)
    a("--loss-chunk-size", type=int, default=512, help="rows per lm_head chunk in the fused loss")
    a("--lora-r", type=int, default=16)
    a("--lora-alpha", type=float, default=32.0)
    a("--lora-dropout", type=float, default=0.0)
    a("--lora-targets", nargs="+", default=list(DEFAULT_TARGETS))
    a("--lora-scope", default="block", choices=["block", "all"])
    a("--lr", type=float, default=None, help="default 2e-4 (or the ds_config's optimizer lr)")
    a("--weight-decay", type=float, default=None)
    a("--warmup-ratio", type=float, default=0.04)
    a("--lr-schedule", default="cosine", choices=["cosine", "linear", "constant"])
    a("--grad-clip", type=float, default=None, help="default 1.0 (or the ds_config's gradient_clipping)")
    a("--epochs", type=int, default=1)
    a("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    a("--micro-batch-size", type=int, default=None, help="sequences per rank per micro-step (default 1)")
    a("--grad-accum", type=int, default=None, help="micro-steps per optimizer step (default 1)")
    a("--max-length", type=int, default=2048)
    a("--seed", type=int, default=0)
    a("--gradient-checkpointing", action="store_true")
    a("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flex_attention"])
    a("--max-nonfinite", type=int, default=10, help="abort after this many skipped non-finite losses")
    a("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
      help="a collective that waits longer for another rank fails the run with a clear message (a dead or hung "
           "rank); must exceed the slowest checkpoint save. Set-up waits max(this, 1800 s). Default 1800")
    a("--bad-lines", default="skip", choices=["skip", "error"])
    a("--truncated", default="keep", choices=["keep", "drop"],
      help="regenerated answers cut off at the token limit: keep them without supervising the end-of-turn the "
           "target never wrote (default; measured tau 3.20 vs 1.73 for drop on the tiny demo), or drop them")
    a("--num-proc", type=int, default=1, help="processes for tokenisation")
    a("--log-interval", type=int, default=1)
    a("--save-interval", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep-last", type=int, default=2)
    a("--resume", default=None, help="'auto' (latest checkpoint in OUTPUT/checkpoints) or a checkpoint path")
    a("--eval-interval", type=int, default=0, help="run speculative-decoding eval every N steps")
    a("--eval-prompts", default=None)
    a("--eval-max-new-tokens", type=int, default=64)
    a("--eval-limit", type=int, default=8)
    a("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def parse_train_args(argv: list[str] | None) -> TrainConfig:
    ns = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(ns))
    cfg.lora_targets = tuple(cfg.lora_targets)
    return cfg


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
    (its ``tensor_parallel`` section removed: dflash-ds shards the model itself, see dflash_ds/lora.py)."""
    ds = json.loads(json.dumps(ds))
    micro = _fill(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size, 1, "--micro-batch-size",
                  "train_micro_batch_size_per_gpu")
    gas = _fill(ds, "gradient_accumulation_steps", cfg.grad_accum, 1, "--grad-accum", "gradient_accumulation_steps")
    _fill(ds, "gradient_clipping", cfg.grad_clip, 1.0, "--grad-clip", "gradient_clipping")
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
    _fill(params, "lr", cfg.lr, 2e-4, "--lr", "optimizer.params.lr")
    _fill(params, "weight_decay", cfg.weight_decay, 0.0, "--weight-decay", "optimizer.params.weight_decay")
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
