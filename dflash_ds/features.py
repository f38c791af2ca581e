"""``dflash-ds features``: the offline-feature pass of the standalone kind. Run it with the training command's own
flags (``--drafter dflash --features DIR`` among them); it writes what that training run reads from the target
(:mod:`dflash_ds.kinds.dflash.feature_cache`), and ``dflash-ds train`` with the same flags then runs none of the
target's decoder layers.

One pass of the frozen target per training example, sharded over the launcher's ranks (example ``i`` on rank
``i % world``), resumable (a rerun with the same flags continues after the last example each rank recorded), with a
progress bar and the disk it needs printed (and checked) before anything is written.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .config import TrainConfig, parse_train_args
from .data import build_dataset, dataset_key, sequence_lengths
from .families import check_max_length, decoder, family_of
from .kinds import DFLASH, kind_class
from .kinds.dflash.feature_cache import (
    COMPLETE, FeatureCacheError, FeatureManifest, FeatureWriter, check_disk, open_for_writing, target_fingerprint,
)
from .kinds.dflash.feature_tap import FeatureTap
from .mask_token import resolve_mask_token
from .parallel import exit_on_dist_failure
from .train import accelerator_device_type, init_distributed

FLUSH_EVERY = 16  # examples between two durable index records (a killed run redoes at most this many)


def expected_manifest(cfg: TrainConfig, tokenizer, target_config, mask_token_id: int, examples: int, tokens: int,
                      dtype: torch.dtype, world_size: int) -> FeatureManifest:
    """The manifest the run ``cfg`` needs: its target, layer ids, tokenised data, dtype and KL teacher."""
    ids = cfg.drafter.draft_config(target_config, cfg.blocks.block_size, None).dflash_config["target_layer_ids"]
    return FeatureManifest(target=target_fingerprint(cfg.model_path), layer_ids=list(ids),
                           hidden_size=int(target_config.hidden_size),
                           data_key=dataset_key(tokenizer, cfg.data, mask_token_id), max_length=cfg.data.max_length,
                           examples=examples, tokens=tokens, dtype=str(dtype).removeprefix("torch."),
                           with_final=cfg.loss.kl_weight > 0, world_size=world_size, data_paths=list(cfg.data.paths))


def write_features(cfg: TrainConfig) -> Path:
    """The pass; returns the feature directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if cfg.drafter.kind != DFLASH or not cfg.drafter.features:
        raise ValueError("dflash-ds features writes the standalone drafter's target features: it needs --drafter "
                         "dflash and --features DIR (then train with the same flags)")
    cfg.validate()
    model_config = AutoConfig.from_pretrained(cfg.model_path)
    family_of(model_config)
    check_max_length(model_config, cfg.data.max_length)
    kind_class(cfg.drafter.kind).check_target(cfg, model_config)
    init_distributed(cfg.dist_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    device_type = accelerator_device_type()
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32  # what the trainer's bf16 "auto" picks

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    mask = resolve_mask_token(tokenizer, model_config.vocab_size, cfg.blocks.mask_token_id,
                              allow_ordinary=cfg.blocks.allow_ordinary_mask_token)
    root = Path(cfg.drafter.features)
    data_cfg = cfg.data if cfg.data.cache_dir else _with_cache(cfg, root)
    if rank == 0:
        dataset = build_dataset(tokenizer, data_cfg, mask_token_id=mask.token_id)
    dist.barrier()
    if rank != 0:
        dataset = build_dataset(tokenizer, data_cfg, mask_token_id=mask.token_id)
    lengths = sequence_lengths(dataset)
    manifest = expected_manifest(cfg, tokenizer, model_config, mask.token_id, len(dataset), sum(lengths), dtype,
                                 world)
    if rank == 0:
        open_for_writing(root, manifest)
    dist.barrier()
    writer = FeatureWriter(root, rank, manifest)
    done = writer.done()
    mine = [i for i in range(rank, len(dataset), world) if i not in done]
    if rank == 0:
        check_disk(root, manifest)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype,
                                                 attn_implementation=cfg.attn_implementation).to(device).eval()
    tap = FeatureTap.of(model, manifest.layer_ids)
    stack = decoder(model)
    bar = tqdm(total=len(range(rank, len(dataset), world)), initial=len(done), disable=rank != 0,
               desc="features", unit="example", dynamic_ncols=True)
    try:
        for n, i in enumerate(mine, 1):
            ids = torch.tensor([dataset[i]["input_ids"]], dtype=torch.long, device=device)
            with torch.no_grad(), tap.recording():
                out = stack(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=device)[None],
                            use_cache=False)
                feats = tap.take(manifest.layer_ids)[0]
            writer.append(i, feats, out.last_hidden_state[0] if manifest.with_final else None,
                          flush=n % FLUSH_EVERY == 0)
            bar.update(1)
    finally:
        writer.close()
        bar.close()
    dist.barrier()
    if rank == 0:
        (root / COMPLETE).write_text("")
        print(f"features written to {root}", flush=True)
    return root


def _with_cache(cfg: TrainConfig, root: Path):
    return replace(cfg.data, cache_dir=str(root / "data_cache"))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_train_args(argv)
        with exit_on_dist_failure("dflash-ds features"):
            write_features(cfg)
    except (ValueError, FeatureCacheError) as exc:
        print(f"dflash-ds features: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
