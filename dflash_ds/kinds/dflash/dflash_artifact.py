"""The standalone kind's artifact: the published format (``config.json`` with ``architectures:
["DFlashDraftModel"]`` + ``model.safetensors``) that SGLang and vLLM load, written from a model
(:func:`save_dflash_draft`) or from a checkpoint's gathered weights (:func:`export_dflash_drafter`), and read back:
its metadata alone (:func:`read_standalone_meta`, what a decoder needs) or the model beside its target
(:func:`load_standalone`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3Config

from ...files import replace_dir
from ..base import DrafterDirError
from .dflash_model import ARCHITECTURE, DFlashDraftModel, check_pairing, target_layer_ids_of

WEIGHTS_NAME = "model.safetensors"


@dataclass
class StandaloneMeta:
    """What a decoder needs to know of a standalone DFlash drafter, from its ``config.json``."""

    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    num_hidden_layers: int  # draft layers
    num_target_layers: int
    hidden_size: int = 0
    base_model: str = ""
    draft_vocab_size: int | None = None  # its own lm_head over a draft vocabulary (d2t), else the target's
    kind: str = "dflash"
    scope: None = None  # no LoRA scope: the target is never adapted


@dataclass
class DFlashMeta(StandaloneMeta):
    """What a ``dflash`` checkpoint records beside its weights: a decoder's view of the drafter
    (:class:`StandaloneMeta`, what the eval takes) plus enough to export it without a model."""

    mask_token: str | None = None
    mask_token_rule: str = ""
    draft_init: str = "target"
    dtype: str = "float32"  # the trained weights' dtype: the export keeps it (bf16 on a GPU, fp32 on a CPU)
    config: dict = field(default_factory=dict)  # the draft model's config (to_dict), with the DFlash keys




def config_dict(config) -> dict:
    """``config.json`` content: the Qwen3 config with the DFlash keys, plus the legacy ``rope_theta`` /
    ``rope_scaling`` keys beside ``rope_parameters`` so that readers of either transformers generation agree."""
    d = config.to_dict()
    rope = dict(d.get("rope_parameters") or {})
    d["architectures"] = [ARCHITECTURE]
    d["rope_theta"] = rope.get("rope_theta", 10000.0)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    d["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    return d


def save_dflash_draft(model: DFlashDraftModel, out_dir, target_config=None, block_size: int | None = None,
                      mask_token_id: int | None = None, state_dict: dict | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by SGLang (``--speculative-algorithm DFLASH``) and
    vLLM (``"method": "dflash"``). ``target_config`` checks the pairing (depth, width, vocab); ``block_size`` /
    ``mask_token_id`` override the config's. ``state_dict``: gathered weights (ZeRO-3), default the model's.
    ``dtype``: cast floating weights (e.g. ``torch.bfloat16``), default as they are."""
    cfg = config_dict(model.config)
    if block_size is not None:
        cfg["block_size"] = int(block_size)
    if mask_token_id is not None:
        cfg["dflash_config"] = {**cfg["dflash_config"], "mask_token_id": int(mask_token_id)}
    if cfg["dflash_config"].get("mask_token_id") is None:
        raise ValueError("a DFlash export needs a mask_token_id (the serving engines embed it at block rows 1..B-1)")
    if target_config is not None:
        check_pairing(target_config, cfg["num_target_layers"], cfg["hidden_size"], cfg["vocab_size"])
    sd = model.state_dict() if state_dict is None else state_dict
    tensors = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    floats = [v.dtype for v in tensors.values() if v.is_floating_point()]
    if floats:  # what the weights are stored in (v5 reads "dtype", v4 "torch_dtype")
        cfg["dtype"] = cfg["torch_dtype"] = str(floats[0]).removeprefix("torch.")
    # the drafts a step the drafter was trained for (vLLM requires it and reads it nowhere else); no path from the
    # training machine: base_model is the target's directory name
    cfg["dflash_ds"] = {**(cfg.get("dflash_ds") or {}), "num_speculative_tokens": cfg["block_size"] - 1}
    if model.has_own_lm_head:  # vLLM: keep the drafter's lm_head (draft_vocab_size rows), never share the target's
        cfg["has_own_lm_head"] = True
    if cfg.get("base_model"):
        cfg["base_model"] = Path(str(cfg["base_model"])).name
    cfg.pop("_name_or_path", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / SERVING_NAME).write_text(serving_text(cfg))
    return out


SERVING_NAME = "SERVING.md"


def serving_commands(drafter_dir: str, target: str, block_size: int) -> dict[str, str]:
    """The vLLM and SGLang invocations that serve a drafter of ``block_size`` with ``target``."""
    spec = json.dumps({"method": "dflash", "model": drafter_dir, "num_speculative_tokens": block_size - 1})
    return {"vllm": f"vllm serve {target} --speculative-config '{spec}'",
            "vllm_python": f"LLM(model={target!r}, speculative_config={spec})",
            "sglang": f"python -m sglang.launch_server --model-path {target} --speculative-algorithm DFLASH "
                      f"--speculative-draft-model-path {drafter_dir}"}


def serving_text(cfg: dict) -> str:
    """``SERVING.md`` of an export: how to serve it, with the block size it was trained for."""
    B = int(cfg["block_size"])
    target = cfg.get("base_model") or "TARGET"
    cmds = serving_commands("THIS_DIRECTORY", target, B)
    return (f"# Serving this DFlash drafter\n\nTrained for target `{target}` with blocks of {B}: each step drafts "
            f"{B - 1} tokens, so `num_speculative_tokens` is {B - 1} (vLLM requires it).\n\n"
            f"vLLM (`pip install vllm`):\n\n```bash\n{cmds['vllm']}\n```\n\nor in Python, "
            f"`{cmds['vllm_python']}`.\n\nSGLang:\n\n```bash\n{cmds['sglang']}\n```\n\n"
            "Replace `THIS_DIRECTORY` with this directory's path and the target with its path or hub id. Greedy "
            "outputs are the target's own; `dflash-ds serve-check` tests that round trip.\n")


def load_dflash_draft(path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> DFlashDraftModel:
    """Read an export back (``config.json`` via transformers' ``Qwen3Config``, weights strictly)."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if ARCHITECTURE not in (raw.get("architectures") or []):
        raise ValueError(f"{path} is not a DFlash draft (architectures={raw.get('architectures')})")
    config = Qwen3Config.from_pretrained(path)
    config.dflash_config = dict(getattr(config, "dflash_config", None) or {})
    model = DFlashDraftModel(config)
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def read_standalone_meta(path: Path) -> StandaloneMeta:
    """A standalone drafter directory's :class:`StandaloneMeta` from its ``config.json`` (no weights read);
    :class:`DrafterDirError` naming the file when it cannot be read."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise DrafterDirError(f"{path / 'config.json'}: not JSON: {exc}") from exc
    archs = raw.get("architectures") or []
    if ARCHITECTURE not in archs:
        raise DrafterDirError(f"{path}: its config.json is a {', '.join(archs) or 'model without architectures'} "
                              "(a target model? pass it as --model-path)")
    dc = raw.get("dflash_config") or {}
    try:
        L, N = int(raw["num_hidden_layers"]), int(raw["num_target_layers"])
        meta = StandaloneMeta(block_size=int(raw["block_size"]), mask_token_id=dc.get("mask_token_id"),
                              target_layer_ids=target_layer_ids_of(dc, N, L), num_hidden_layers=L,
                              num_target_layers=N, hidden_size=int(raw.get("hidden_size", 0)),
                              base_model=str(raw.get("base_model") or raw.get("_name_or_path") or ""),
                              draft_vocab_size=_draft_vocab_size(raw))
    except (KeyError, TypeError, ValueError) as exc:
        raise DrafterDirError(f"{path / 'config.json'}: unreadable DFlash draft config ({type(exc).__name__}: "
                              f"{exc}); it needs block_size, num_hidden_layers, num_target_layers") from exc
    if meta.mask_token_id is None:
        raise DrafterDirError(f"{path / 'config.json'}: no dflash_config.mask_token_id (the drafter's block rows "
                              "1..B-1 embed it)")
    meta.mask_token_id = int(meta.mask_token_id)
    return meta


def _draft_vocab_size(raw: dict) -> int | None:
    n = raw.get("draft_vocab_size")
    return None if n is None or int(n) == int(raw.get("vocab_size", -1)) else int(n)


def load_standalone(path: Path, meta: StandaloneMeta, target: nn.Module) -> DFlashDraftModel:
    """The standalone drafter at ``path`` on the target's device and dtype, checked against the target (depth,
    width, MASK id), in eval mode; :class:`DrafterDirError` naming the path when it does not fit."""
    param = next(target.parameters())
    cfg = target.config
    try:
        check_pairing(cfg, meta.num_target_layers, meta.hidden_size or cfg.hidden_size)
    except ValueError as exc:
        raise DrafterDirError(f"{path}: {exc}") from None
    if not 0 <= meta.mask_token_id < cfg.vocab_size:
        raise DrafterDirError(f"{path}: MASK id {meta.mask_token_id} is outside this target's vocabulary "
                              f"({cfg.vocab_size})")
    drafter = load_dflash_draft(path, dtype=param.dtype, device=param.device)
    if drafter.has_own_lm_head and int(drafter.vocab_ids().max()) >= cfg.vocab_size:
        raise DrafterDirError(f"{path}: its draft vocabulary (d2t) names target ids up to "
                              f"{int(drafter.vocab_ids().max())}, outside this target's vocabulary ({cfg.vocab_size})")
    return drafter


def export_dflash_drafter(weights: dict[str, torch.Tensor], meta: DFlashMeta, out_dir) -> Path:
    """Write a standalone drafter's ``weights`` (full, by state-dict key) in the published format with
    :func:`save_dflash_draft`, in the training dtype, atomically (a ``.tmp`` folder, then renamed). No model is
    built: the config rides on a shell on the meta device."""
    config = Qwen3Config.from_dict(meta.config)
    with torch.device("meta"):
        shell = DFlashDraftModel(config)
    expected = set(shell.state_dict())
    if set(weights) != expected:
        raise ValueError(f"drafter weights do not match its config: missing {sorted(expected - set(weights))[:3]}, "
                         f"unexpected {sorted(set(weights) - expected)[:3]}")
    dtype = getattr(torch, meta.dtype)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_dflash_draft(shell, tmp, block_size=meta.block_size, mask_token_id=meta.mask_token_id,
                      state_dict={k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()})
    replace_dir(tmp, out)
    return out


__all__ = ["DFlashMeta", "SERVING_NAME", "StandaloneMeta", "WEIGHTS_NAME", "config_dict", "serving_commands",
           "serving_text", "export_dflash_drafter",
           "load_dflash_draft", "load_standalone", "read_standalone_meta", "save_dflash_draft"]
