"""Checkpoints: DeepSpeed's own per-rank files plus a small rank-independent state, written crash-safely.

Layout of ``OUTPUT/checkpoints``::

    step_00000010/            one complete checkpoint (renamed from step_00000010.partial once every rank wrote)
        <DeepSpeed files>     engine.save_checkpoint(..., exclude_frozen_parameters=True): drafter + optimizer
        dflash_state.pt       full (gathered) drafter weights, Adam moments, step, schedule, layout, drafter kind and
                              drafting metadata (enough to export it without a model)
        COMPLETE
    latest                    name of the newest complete checkpoint (replaced atomically)

A crash during a save leaves only a ``.partial`` directory, which resume ignores. Saving a step that already has a
checkpoint renames the old one aside (``step_00000010.old``) before the new one moves in, so a crash between the
renames still leaves a complete checkpoint of that step, which resume finds. Resuming on the same parallel
layout uses DeepSpeed's files (bit-exact); on a different number of ranks the rank-independent state is loaded
into the new layout through DeepSpeed's ``safe_set_full_*`` API.

What the drafter's trainable tensors are, under which keys, and how each is gathered over tensor parallelism and
sliced back, is the drafter kind's (:mod:`dflash_ds.kinds`): PEFT-keyed LoRA factors split with their
projections, or the standalone drafter's published state-dict names, replicated.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .kinds import DraftKind, draft_kind, export_state, kind_class, state_kind
from .faults import faults

STATE_FILE = "dflash_state.pt"
ASIDE = ".old"  # a complete checkpoint renamed aside while a new save of the same step replaces it
COMPLETE = "COMPLETE"
TENSOR_KEYS = ("adapter", "drafter", "optimizer", "lr_scheduler")  # a state's parts that are not client state
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_optimizer_state(kind: DraftKind, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Full fp32 master weights and Adam moments per key of the drafter ``kind``'s entries (PEFT keys for LoRA),
    gathered over ZeRO and TP (collective), on the CPU.

    The TP all-gather runs on ``device`` (the compute device): ZeRO-Offload keeps these states on the CPU, and a
    collective's tensor must be on a device its group has a backend for (NCCL has no CPU one)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, dict[str, torch.Tensor]] = {}
    for e in kind.entries():
        p = e.param
        entry = {"fp32": safe_get_full_fp32_param(p), **{k: safe_get_full_optimizer_state(p, k) for k in ADAM_KEYS}}
        out[e.key] = {k: e.gather(v.detach().float().to(device)).cpu() for k, v in entry.items() if v is not None}
    return out


def restore_optimizer_state(kind: DraftKind, optimizer, state: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    """Load gathered master weights and Adam moments into this rank's (possibly differently sharded) layout."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _materialise_adam_state(optimizer, step)
    for e in kind.entries():
        entry, p = state[e.key], e.param
        safe_set_full_fp32_param(p, e.slice(entry["fp32"]).to(p.device))
        for key in ADAM_KEYS:
            if key in entry:
                safe_set_full_optimizer_state(p, e.slice(entry[key]).to(p.device), key)


def _materialise_adam_state(optimizer, step: int) -> None:
    """torch Adam creates its state lazily at the first step, and DeepSpeed links per-parameter views into it only
    then; a resumed run has not stepped yet, so create the state (with the saved bias-correction step) and link.
    ZeRO-3 keeps its flat fp32 partitions out of the inner optimizer's groups between steps (it puts each in for its
    own step), so those get their state too."""
    inner = getattr(optimizer, "optimizer", optimizer)
    params = [p for group in inner.param_groups for p in group["params"]]
    params += [p for p in getattr(optimizer, "fp32_partitioned_groups_flat", None) or [] if p is not None]
    for p in params:
        st = inner.state[p]
        st["step"] = torch.tensor(float(step))
        for key in ADAM_KEYS:
            st.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2: (re)point each parameter's fragment at the new state
        optimizer._hp_optimizer_states_linked = False
        link()


def save_checkpoint(engine, root: str | Path, step: int, client_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = Path(root)
    tag = f"step_{step:08d}"
    partial = root / f"{tag}.partial"
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(
        str(root), tag=partial.name, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
    )
    kind = draft_kind(engine.module)
    state = dict(client_state)
    state[kind.weights_key] = _gathered_adapter(engine)
    state["optimizer"] = gather_optimizer_state(kind, engine.device)
    state["lr_scheduler"] = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    faults.at("IN_SAVE", step)  # tests: die mid-save, before the rename
    if _rank() == 0:
        torch.save(state, partial / STATE_FILE)
        (partial / COMPLETE).write_text(f"{step}\n")
        publish(partial, root / tag)
        tmp = root / "latest.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, root / "latest")
        _prune(root, keep_last)
        print(f"checkpoint {root / tag} written", flush=True)
    _barrier()
    return root / tag


def publish(partial: Path, final: Path) -> None:
    """Rename the complete checkpoint ``partial`` to ``final`` so that a complete checkpoint of that step exists at
    every moment, even when ``final`` already holds one (a step saved again, e.g. by a run resumed from its final
    checkpoint): the old one is renamed aside to ``final.old`` (which :func:`find_checkpoint` also accepts), the new
    one renamed in, and only then the old one deleted. Each rename is atomic."""
    aside = final.with_name(final.name + ASIDE)
    if final.exists():
        if aside.exists():  # left by a crash after its replacement was in place: final is complete
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(partial, final)
    shutil.rmtree(aside, ignore_errors=True)


def complete_or_aside(path: Path) -> Path:
    """``path``, or its ``.old`` twin where only that one is complete (a re-save interrupted between renames)."""
    aside = path.with_name(path.name + ASIDE)
    return aside if not (path / COMPLETE).exists() and (aside / COMPLETE).exists() else path


def _step_of(path: Path) -> int | None:
    """The step of a checkpoint directory ``step_XXXXXXXX`` or ``step_XXXXXXXX.old``; None for anything else."""
    name = path.name[: -len(ASIDE)] if path.name.endswith(ASIDE) else path.name
    digits = name[len("step_") :]
    return int(digits) if name.startswith("step_") and digits.isdigit() else None


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, one per step, oldest first: ``step_XXXXXXXX``, or its ``.old``
    twin where a re-save of that step was interrupted between its renames (:func:`publish`)."""
    found: dict[int, Path] = {}
    for path in sorted(Path(root).glob("step_*")):  # "step_N" sorts before "step_N.old": the plain one wins
        step = _step_of(path)
        if step is not None and step not in found and path.is_dir() and (path / COMPLETE).exists():
            found[step] = path
    return [found[step] for step in sorted(found)]


def _gathered_adapter(engine) -> dict[str, torch.Tensor]:
    """The drafter's full trainable weights (the LoRA kind: its adapter), gathered over ZeRO-3 and TP (collective)."""
    import deepspeed

    kind = draft_kind(engine.module)
    params = kind.trainable_parameters()
    zero3 = any(hasattr(p, "ds_id") for p in params)
    ctx = deepspeed.zero.GatheredParameters(params) if zero3 else contextlib.nullcontext()
    with ctx:
        return kind.full_weights()


def _prune(root: Path, keep_last: int) -> None:
    if keep_last < 1:
        return
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(old.with_name(old.name.removesuffix(ASIDE) + ASIDE), ignore_errors=True)


def find_checkpoint(spec: str, output_dir: str | Path) -> Path | None:
    """``auto`` -> newest complete checkpoint under OUTPUT/checkpoints (None if there is none); else a path."""
    if spec == "auto":
        done = complete_checkpoints(Path(output_dir) / "checkpoints")
        return done[-1] if done else None
    path = complete_or_aside(Path(spec))
    if not (path / COMPLETE).exists() or not (path / STATE_FILE).exists():
        raise ValueError(f"--resume {spec}: not a complete dflash-ds checkpoint (no {COMPLETE} / {STATE_FILE})")
    return path


def read_client_state(path: Path) -> dict:
    """The saved client state of a checkpoint (step, samples, layout...), without its tensors' owners."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
    return {k: v for k, v in state.items() if k not in TENSOR_KEYS}


def load_checkpoint(engine, path: Path, layout_now: dict) -> dict:
    """Restore drafter, optimizer, schedule; returns the saved client state (step, data position, RNG...)."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if state.get("layout") == layout_now:
        _, client = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {path}")
        return client
    # different parallel layout: load the gathered state into this layout
    restore_optimizer_state(draft_kind(engine.module), engine.optimizer, state["optimizer"], state["step"])
    if state.get("lr_scheduler") is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
        # a scheduler's state holds counters only; the optimizer's current lr must be set to match
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = state["step"]
    engine.global_samples = state.get("samples", 0)
    _sync_module_from_fp32(engine)
    return {k: v for k, v in state.items() if k not in TENSOR_KEYS}


def _sync_module_from_fp32(engine) -> None:
    """After setting fp32 master weights, copy them into the module's (possibly low-precision) weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    import deepspeed

    for p in draft_kind(engine.module).trainable_parameters():
        full = safe_get_full_fp32_param(p)
        zero3 = hasattr(p, "ds_id")
        # modifier_rank 0: what is written inside is re-partitioned (None would discard it)
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0) if zero3 else contextlib.nullcontext():
            p.data.copy_(full.to(p.dtype))


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Write the drafter of a checkpoint (no DeepSpeed, no model needed), atomically: a PEFT adapter directory +
    ``dflash.json`` (LoRA kind) or a DFlash draft model directory, ``config.json`` + ``model.safetensors`` (dflash
    kind)."""
    return _export(path, out_dir)[0]


def _export(path: str | Path, out_dir: str | Path) -> tuple[Path, str]:
    """:func:`export_checkpoint`, and the kind it exported."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"{path}: no {STATE_FILE}; pass a checkpoint directory such as OUTPUT/checkpoints/step_00000100")
    if not (path / COMPLETE).exists():
        raise ValueError(f"{path}: a half-written checkpoint (no {COMPLETE}: its save was interrupted); "
                         "export a complete one, e.g. OUTPUT/checkpoints for the latest")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return export_state(state, out_dir), state_kind(state)


def main_export(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflash-ds export", description="Export a checkpoint's drafter: a PEFT adapter "
                                "directory (--drafter lora) or a DFlash draft model directory in the published format "
                                "(--drafter dflash)")
    p.add_argument("checkpoint", help="OUTPUT/checkpoints/step_XXXXXXXX (or OUTPUT/checkpoints for the latest)")
    p.add_argument("out")
    args = p.parse_args(argv)
    ckpt = Path(args.checkpoint)
    if (ckpt / "latest").exists() and not (ckpt / STATE_FILE).exists():
        ckpt = complete_or_aside(ckpt / (ckpt / "latest").read_text().strip())
    try:
        out, kind = _export(ckpt, args.out)
    except ValueError as exc:
        print(f"dflash-ds export: error: {exc}", file=sys.stderr)
        return 2
    print(f"{kind_class(kind).artifact_dir} written to {out}")
    return 0
