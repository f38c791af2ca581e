"""The standalone DFlash kind behind the seam (:class:`DFlashKind`): a few decoder layers reading the frozen target's
hidden states (:mod:`.dflash_model`), trained by :class:`~.dflash_objective.DFlashDraftObjective`, exported in the
published format SGLang and vLLM load (``OUTPUT/drafter``, :mod:`.dflash_artifact`), decoded by the engine's
two-forward loop with its own draft forward (:mod:`.dflash_decode`). Its settings: :class:`DFlashConfig`.

Tensor parallelism: the target is sharded as for the LoRA kind (:func:`dflash_ds.lora.shard_target`); the drafter is
*replicated* on every TP rank (a few layers; sharding them would need TP-aware draft layers and buys little memory):
every rank of a TP group sees the same batch and the same full features (the row-parallel all-reduce makes them
identical), and its gradients are averaged over the TP group as autograd produces them
(:func:`average_gradients_over_tp`), so the replicas stay equal even where a kernel's backward is not
bit-deterministic (GPU attention, index_put).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from transformers import AutoTokenizer

from ... import collectives
from ...data import dataset_key
from ...families import decoder
from ...lora import shard_target
from ...objective import register_lm_head
from ...parallel import TPGroup
from ...settings import check_choices, setting
from ...speculative.decoders import Generation, Method
from ...speculative.engine import eos_ids_of
from ..base import DraftKind, DrafterArtifact, EvalDrafter, Entry, checked_block_size, plural
from .dflash_artifact import (
    WEIGHTS_NAME, DFlashMeta, StandaloneMeta, export_dflash_drafter, load_standalone, read_standalone_meta,
)
from .dflash_decode import dflash_generate
from .dflash_model import (
    ARCHITECTURE, DFlashDraftModel, init_draft_head, init_from_target, last_layer_ids, make_draft_config,
)
from .draft_vocab import VOCAB_FILE, DraftVocab, run_draft_vocab
from .dflash_objective import DFlashDraftObjective
from .feature_cache import FeatureStore, target_fingerprint
from .feature_tap import FeatureTap

DFLASH = "dflash"
DRAFT_INITS = ("target", "random")
DRAFT_HEADS = ("frozen", "trained")
OUTSIDE_LABELS = ("kl", "drop")


@dataclass
class DFlashConfig:
    """The standalone drafter's shape and initialisation (``--drafter dflash``)."""

    layers: int = setting(1, "dflash: number of draft (decoder) layers; each costs about one target layer per "
                          "draft forward", flag="draft-layers", metavar="N")
    target_layer_ids: tuple[int, ...] | None = setting(
        None, "dflash: the target layers whose outputs feed the drafter (default: the published rule, "
        "round(1 + i*(N-4)/(L-1)) for L draft layers, [N//2] for one)", flag="target-layer-ids", metavar="ID")
    init: str = setting("target", "dflash: draft layers copied from the target's last layers (fc = the mean of the "
                        "features, norms from the target), or random (the reference's post_init)",
                        flag="draft-init", choices=DRAFT_INITS)
    features: str | None = setting(None, "dflash: read the target's features from this directory (written by "
                                   "'dflash-ds features' with this run's flags) instead of running the target's "
                                   "decoder layers every step", metavar="DIR")
    draft_vocab: int | None = setting(
        None, "dflash: draft over the N tokens most frequent in the training answers (EAGLE-3's draft vocabulary: "
        "the drafter's own lm_head over them and a d2t map, which vLLM serves; every EOS id is kept; the choice and "
        "its coverage go to OUTPUT/draft_vocab.json); default: the target's whole vocabulary through its lm_head",
        metavar="N")
    draft_head: str = setting("frozen", "dflash: the draft vocabulary's lm_head (the target's rows of it) frozen or "
                              "trained with the drafter", choices=DRAFT_HEADS)
    draft_vocab_outside: str = setting(
        "kl", "dflash: a supervised token outside the draft vocabulary keeps its KL term toward the target's "
        "distribution over the vocabulary (kl) or its row leaves the loss (drop, as EAGLE-3 masks it)",
        choices=OUTSIDE_LABELS)

    def __post_init__(self) -> None:
        check_choices(self)
        if self.layers < 1:
            raise ValueError(f"--draft-layers must be >= 1, got {self.layers}")
        if self.target_layer_ids is not None:
            self.target_layer_ids = tuple(int(i) for i in self.target_layer_ids)
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise ValueError(f"--draft-vocab must be >= 1, got {self.draft_vocab}")
        if self.draft_vocab is None:
            for flag, value, default in (("--draft-head", self.draft_head, "frozen"),
                                         ("--draft-vocab-outside", self.draft_vocab_outside, "kl")):
                if value != default:
                    raise ValueError(f"{flag} {value} needs --draft-vocab N (a draft vocabulary)")

    def draft_config(self, target_config, block_size: int, mask_token_id: int | None):
        """The draft model's config for ``target_config`` (:func:`.dflash_model.make_draft_config`); ValueError
        naming the flags when the target cannot take it."""
        try:
            if self.init == "target":
                last_layer_ids(int(target_config.num_hidden_layers), self.layers)
            return make_draft_config(target_config, self.layers, self.target_layer_ids, block_size=block_size,
                                     mask_token_id=mask_token_id, draft_vocab_size=self.draft_vocab)
        except ValueError as exc:
            raise ValueError(f"--drafter dflash (--draft-layers {self.layers}, --target-layer-ids "
                             f"{'default' if self.target_layer_ids is None else list(self.target_layer_ids)}): "
                             f"{exc}") from None


class StandaloneLoop(Method):
    """A standalone DFlash drafter (:func:`dflash_generate`): its own draft forward, then the target's verify
    forward on the session every loop uses (static/compiled, lockstep)."""

    def generate(self, prompt, generator, max_new_tokens):
        s = self.setup
        r = dflash_generate(s.model, self.drafter.model, prompt, max_new_tokens, eos_token_ids=s.eos,
                            temperature=s.config.temperature, generator=generator, block_size=s.config.block_size,
                            mask_token_id=s.meta.mask_token_id, static=s.static, lockstep=s.lockstep)
        return Generation(r.output_ids, r.wall_time, r, r.verify_forwards + r.draft_forwards)


def _info(meta: StandaloneMeta) -> dict:
    L = meta.num_hidden_layers
    info = {"layers": plural(L, "draft layer"), "draft_layers": L, "target_layer_ids": list(meta.target_layer_ids)}
    if meta.draft_vocab_size:
        info["draft_vocab_size"] = meta.draft_vocab_size
    return info


def standalone_drafter(draft_model: DFlashDraftModel, name: str | None = None, meta: StandaloneMeta | None = None
                       ) -> EvalDrafter:
    """An in-memory standalone drafter (e.g. one being trained) for :func:`~dflash_ds.evaluate.run_eval`. ``meta``:
    any object with :class:`StandaloneMeta`'s fields (default: read from the model)."""
    if meta is None:
        meta = StandaloneMeta(block_size=int(draft_model.block_size), mask_token_id=int(draft_model.mask_token_id),
                              target_layer_ids=list(draft_model.target_layer_ids),
                              num_hidden_layers=len(draft_model.layers),
                              num_target_layers=int(draft_model.num_target_layers),
                              hidden_size=int(draft_model.config.hidden_size),
                              draft_vocab_size=draft_model.draft_vocab_size)
    head = draft_model.lm_head.weight if draft_model.has_own_lm_head else None
    frozen_head = head.numel() if head is not None and not isinstance(head, nn.Parameter) else 0  # a buffer
    size = sum(getattr(p, "ds_numel", p.numel()) for p in draft_model.parameters()) + frozen_head
    info = {**_info(meta), "parameters": size,
            "block_size": meta.block_size, "mask_token_id": meta.mask_token_id}
    return EvalDrafter(meta, name or "dflash drafter", info, model=draft_model)


def init_drafter_from_target(drafter: DFlashDraftModel, model: nn.Module) -> list[int]:
    """:func:`.dflash_model.init_from_target`; under ZeRO-3 (the target partitioned) inside a gather of exactly the
    layers it reads and the final norm."""
    dec = decoder(model)
    src = last_layer_ids(len(dec.layers), len(drafter.layers))
    params = [p for i in src for p in dec.layers[i].parameters()] + list(dec.norm.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        return init_from_target(drafter, model, src)


def init_drafter_head(drafter: DFlashDraftModel, model: nn.Module, vocab: DraftVocab) -> None:
    """:func:`.dflash_model.init_draft_head` from the target's ``lm_head``; under ZeRO-3 inside a gather of it."""
    weight = model.get_output_embeddings().weight
    gather = contextlib.nullcontext()
    if hasattr(weight, "ds_id"):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([weight])
    with gather:
        init_draft_head(drafter, weight.detach(), vocab.id_tensor())


def stop_ids(model_path: str, tokenizer, target_config) -> list[int]:
    """Every EOS id decoding may stop on: the tokenizer's, the config's and the generation config's."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's and the config's ids are all there is
        generation = None
    ids = set(eos_ids_of(tokenizer))
    for source in (target_config, generation):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return sorted(int(i) for i in ids)


def average_gradients_over_tp(params: list[nn.Parameter], tp: TPGroup) -> None:
    """Replace each parameter's gradient by its mean over the tensor-parallel group as autograd produces it (a
    tensor hook: before DeepSpeed's accumulation and data-parallel reduction). Every TP rank computes the same
    gradient from the same batch and features; the mean makes the replicas equal whatever a kernel's rounding."""
    group, size = tp.group, tp.size

    def mean(grad: torch.Tensor) -> torch.Tensor:
        return collectives.all_reduce(grad.contiguous().clone(), group=group).div_(size)

    for p in params:
        p.register_hook(mean)


def open_features(cfg, target_config, mask_token_id: int, dtype: torch.dtype) -> FeatureStore | None:
    """The run's offline features (``--features``), checked against what the run needs (its target, layer ids,
    tokenised data, dtype, KL teacher); None without the flag."""
    if not cfg.drafter.features:
        return None
    store = FeatureStore(cfg.drafter.features)
    theirs = store.manifest
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    ids = cfg.drafter.draft_config(target_config, cfg.blocks.block_size, None).dflash_config["target_layer_ids"]
    ours = dataclasses.replace(theirs, target=target_fingerprint(cfg.model_path), layer_ids=list(ids),
                               data_key=dataset_key(tokenizer, cfg.data, mask_token_id),
                               max_length=cfg.data.max_length, dtype=str(dtype).removeprefix("torch."),
                               with_final=cfg.loss.kl_weight > 0, data_paths=list(cfg.data.paths))
    theirs.check_against(ours, cfg.drafter.features)
    return store


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


class DFlashKind(DraftKind):
    """Keys: the published state-dict names (``layers.*``, ``fc.weight``, ``hidden_norm.weight``, ``norm.weight``),
    replicated over TP."""

    name, artifact_dir, weights_key = DFLASH, "drafter", "drafter"
    marker = "config.json"
    summary = f"a standalone DFlash drafter (config.json with architectures [\"{ARCHITECTURE}\"] + {WEIGHTS_NAME})"

    # -- training ---------------------------------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        return [Entry(name, p, _same, _same) for name, p in self.objective.drafter.named_parameters()
                if p.requires_grad]

    def eval_drafter(self, meta) -> EvalDrafter:
        return standalone_drafter(self.objective.drafter, meta=meta)

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The trained tensors plus what the export needs beside them: a frozen draft head and ``d2t`` (buffers,
        the same on every rank)."""
        out = super().full_weights()
        drafter = self.objective.drafter
        if drafter.has_own_lm_head:
            out["d2t"] = drafter.d2t.detach().cpu()
            out.setdefault("lm_head.weight", drafter.lm_head.weight.detach().float().cpu().contiguous())
        return out

    @classmethod
    def check_target(cls, cfg, target_config) -> None:
        cfg.drafter.draft_config(target_config, cfg.blocks.block_size, None)

    @classmethod
    def prepare_data(cls, cfg, dataset, tokenizer, target_config) -> None:
        """``--draft-vocab``: choose the vocabulary from the training answers (rank 0, before the others read it)."""
        run_draft_vocab(cfg.output_dir, cfg.drafter.draft_vocab, dataset, int(target_config.vocab_size),
                        stop_ids(cfg.model_path, tokenizer, target_config))

    @classmethod
    def build(cls, cfg, model, parallel, mask, dtype):
        model.config.use_cache = False  # the target runs once per step under no_grad: no activation checkpointing
        dcfg = cfg.drafter.draft_config(model.config, cfg.blocks.block_size, mask.token_id)
        # extra keys in config.json, ignored by the serving engines: where the drafter came from
        dcfg.base_model = cfg.model_path
        dcfg.dflash_ds = {"mask_token": mask.token, "mask_token_rule": mask.rule, "draft_init": cfg.drafter.init}
        vocab = run_draft_vocab(cfg.output_dir, cfg.drafter.draft_vocab, None, int(model.config.vocab_size), ())
        if vocab is not None:
            dcfg.dflash_ds.update(draft_head=cfg.drafter.draft_head, draft_vocab_sha256=vocab.digest())
        torch.manual_seed(cfg.optim.seed)  # the same drafter on every rank and in every parallel layout
        # on the target's device: under ZeRO-3 DeepSpeed moves only parameters, and d2t, a frozen head and the KL
        # teacher's rows are buffers
        device = model.get_input_embeddings().weight.device
        drafter = DFlashDraftModel(dcfg, train_head=cfg.drafter.draft_head == "trained").to(dtype=dtype, device=device)
        if cfg.drafter.init == "target":
            init_drafter_from_target(drafter, model)  # before sharding: it reads whole target layers
        if vocab is not None:
            init_drafter_head(drafter, model, vocab)
        shard_target(model, parallel.tp)
        objective = DFlashDraftObjective(model, drafter, cfg.loss, gradient_checkpointing=cfg.gradient_checkpointing,
                                         features=open_features(cfg, model.config, mask.token_id, dtype),
                                         drop_outside=cfg.drafter.draft_vocab_outside == "drop")
        if not drafter.has_own_lm_head:  # else the target's head is never read: gathering it would cost its size
            register_lm_head(objective.loss_head, model)
        elif isinstance(drafter.lm_head.weight, nn.Parameter):
            import deepspeed  # ZeRO-3 partitions it at initialize: the loss reads it as a tensor, so it must gather

            deepspeed.zero.register_external_parameter(objective.loss_head, drafter.lm_head.weight)
        if parallel.tp.size > 1:
            average_gradients_over_tp(objective.trainable_parameters(), parallel.tp)
        meta = DFlashMeta(block_size=cfg.blocks.block_size, mask_token_id=mask.token_id,
                          target_layer_ids=list(drafter.target_layer_ids), num_hidden_layers=cfg.drafter.layers,
                          num_target_layers=int(model.config.num_hidden_layers),
                          hidden_size=int(model.config.hidden_size), base_model=cfg.model_path,
                          draft_vocab_size=drafter.draft_vocab_size, mask_token=mask.token,
                          mask_token_rule=mask.rule, draft_init=cfg.drafter.init,
                          dtype=str(dtype).removeprefix("torch."), config=dcfg.to_dict())
        return objective, meta

    @classmethod
    def client_state(cls, cfg, meta) -> dict:
        return {"drafter_kind": DFLASH, "draft_meta": dataclasses.asdict(meta)}

    @classmethod
    def check_resume(cls, saved, cfg, target_config, where) -> None:
        meta = saved.get("draft_meta") or {}
        ids = list(cfg.drafter.draft_config(target_config, cfg.blocks.block_size, None).dflash_config["target_layer_ids"])
        theirs = (meta.get("num_hidden_layers"), list(meta.get("target_layer_ids") or []))
        if theirs != (cfg.drafter.layers, ids):
            raise ValueError(
                f"--resume {where}: the checkpoint's dflash drafter has {theirs[0]} layer(s) reading target layers "
                f"{theirs[1]}; this run builds {cfg.drafter.layers} reading {ids}: resume with --draft-layers "
                f"{theirs[0]} --target-layer-ids {' '.join(map(str, theirs[1]))}")
        config = meta.get("config") or {}
        head = (config.get("dflash_ds") or {}).get("draft_head", "frozen")
        vocab = config.get("draft_vocab_size")
        if (vocab, head if vocab else None) != (cfg.drafter.draft_vocab, cfg.drafter.draft_head if vocab else None):
            raise ValueError(f"--resume {where}: the checkpoint's dflash drafter has --draft-vocab {vocab} "
                             f"(--draft-head {head}); this run asks --draft-vocab {cfg.drafter.draft_vocab} "
                             f"(--draft-head {cfg.drafter.draft_head}): resume with the checkpoint's")
        if vocab:
            ours = run_draft_vocab(cfg.output_dir, vocab, None, int(target_config.vocab_size), ())
            if ours.digest() != (config.get("dflash_ds") or {}).get("draft_vocab_sha256"):
                raise ValueError(f"--resume {where}: the checkpoint's draft vocabulary is not the one in "
                                 f"{Path(cfg.output_dir) / VOCAB_FILE} (other data?): resume into the checkpoint's "
                                 "--output-dir, or train from the start")

    @classmethod
    def export(cls, state, out_dir) -> Path:
        return export_dflash_drafter(state[cls.weights_key], DFlashMeta(**state["draft_meta"]), out_dir)

    # -- artifacts --------------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> DrafterArtifact:
        return DrafterArtifact(path, DFLASH, read_standalone_meta(path), path / WEIGHTS_NAME)

    @classmethod
    def describe(cls, artifact, shapes) -> dict:
        return _info(artifact.meta)

    @classmethod
    def load(cls, model, artifacts: Sequence[DrafterArtifact], names: Sequence[str]) -> list[EvalDrafter]:
        return [EvalDrafter(a.meta, name, {}, model=load_standalone(a.path, a.meta, model))
                for a, name in zip(artifacts, names)]

    # -- decoding ---------------------------------------------------------------------------------------------------

    @classmethod
    def resolve_eval(cls, config, meta, who):
        B = checked_block_size(config, meta, who, 2, "drafter")
        out = copy.copy(config)  # not dataclasses.replace: "dflash" is no --loop choice (one loop for this kind)
        out.loop, out.block_size, out.prompt_lookup_tokens = DFLASH, B, int(config.prompt_lookup_tokens or B - 1)
        return out

    @classmethod
    def prepare_target(cls, model, meta) -> None:
        FeatureTap.of(model, meta.target_layer_ids)  # before any compiled forward: a compiled decoder traces it once

    @classmethod
    def methods(cls, setup, drafter) -> list[Method]:
        m = StandaloneLoop(drafter.key, drafter.label("dflash loop"), setup)
        m.drafter = drafter
        return [m]


__all__ = ["DFLASH", "DFlashKind", "DRAFT_HEADS", "DRAFT_INITS", "DFlashConfig", "StandaloneLoop", "average_gradients_over_tp",
           "init_drafter_from_target", "standalone_drafter"]
