"""The exported adapter directory: PEFT's ``adapter_config.json`` and ``adapter_model.safetensors`` plus
``dflash.json`` (:class:`DraftMeta`, what a decoder needs beyond the weights); written atomically, read with errors
naming the file, and loaded into a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..families import PROJECTIONS as DEFAULT_TARGETS
from ..files import replace_dir
from ..parallel import TPGroup
from .apply import LoRAConfig, apply_lora
from .stacking import stack_projections
from .weights import load_full_lora_state


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DRAFT_META = "dflash.json"


@dataclass
class DraftMeta:
    """What a decoder needs beyond the LoRA weights (``dflash.json`` next to the PEFT files)."""

    block_size: int
    mask_token_id: int
    scope: str
    base_model: str = ""
    mask_token: str | None = None  # the MASK's token text (None: an embedding row no token uses)
    mask_token_rule: str = ""  # which rule chose it (dflash_ds.mask_token.RULES); "" in adapters from before
    # the drafter kind (dflash_ds.kinds): "lora" for an adapter directory; dflash.json files written
    # before the field existed have none and read as "lora". A standalone DFlash drafter is described by its
    # config.json (architectures ["DFlashDraftModel"]), not by a dflash.json
    kind: str = "lora"


def save_adapter_dir(out_dir, state: dict[str, torch.Tensor], config: LoRAConfig, meta: DraftMeta) -> None:
    """Write a PEFT adapter directory plus ``dflash.json``; files appear atomically (tmp dir, then rename)."""
    import json
    import shutil
    from pathlib import Path

    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        base_model_name_or_path=meta.base_model or None,
        task_type="CAUSAL_LM",
    ).save_pretrained(str(tmp))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS))
    (tmp / DRAFT_META).write_text(json.dumps(meta.__dict__, indent=2) + "\n")
    replace_dir(tmp, out)


def read_adapter_meta(path) -> tuple[LoRAConfig, DraftMeta]:
    """The LoRA config and :class:`DraftMeta` of an adapter directory, without its weights (clear errors naming the
    file). A ``dflash.json`` without ``kind`` (written before the field existed) reads as kind ``lora``."""
    import json
    from pathlib import Path

    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DRAFT_META):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: missing (is {path} an adapter exported by dflash-ds?)")
    try:
        peft_cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        meta = DraftMeta(**json.loads((path / DRAFT_META).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable adapter metadata: {exc}") from exc
    if meta.kind != "lora":
        raise ValueError(f"{path / DRAFT_META}: kind {meta.kind!r}; an adapter directory holds kind 'lora' (a "
                         "standalone DFlash drafter is a config.json with architectures ['DFlashDraftModel'])")
    config = LoRAConfig(
        r=int(peft_cfg["r"]),
        alpha=float(peft_cfg["lora_alpha"]),
        dropout=float(peft_cfg.get("lora_dropout", 0.0)),
        target_modules=tuple(sorted(peft_cfg["target_modules"], key=DEFAULT_TARGETS.index)),
        scope=meta.scope,
    )
    return config, meta


def read_adapter_dir(path) -> tuple[LoRAConfig, DraftMeta, dict[str, torch.Tensor]]:
    """Read an adapter directory written by :func:`save_adapter_dir` (clear errors naming the file)."""
    from pathlib import Path

    from safetensors.torch import load_file

    config, meta = read_adapter_meta(path)
    return config, meta, load_file(str(Path(path) / ADAPTER_WEIGHTS))


def load_adapter_dir(model: nn.Module, path, tp: TPGroup | None = None, stack: bool = False) -> DraftMeta:
    """Fit ``model`` with the adapter saved at ``path`` (in place); returns its drafting metadata. ``stack``: for
    eager decoding only, stack the projections that share an input (:func:`stack_projections`; better called after
    moving the model to its device, as ``dflash-ds eval`` does)."""
    config, meta, state = read_adapter_dir(path)
    apply_lora(model, config, tp=tp)
    load_full_lora_state(model, state)
    if stack:
        stack_projections(model)
    return meta
