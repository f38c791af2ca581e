"""Offline target features (``dflash-ds features``, ``--features DIR``): one step from the stored features equals one
step with the target run online; training from them reproduces the online run on 1 process, ZeRO-2 x2 and ZeRO-3
x2; a directory made for another run, an incomplete one or one that will not fit is a clear error; a killed pass
resumes to the same bytes."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from dflash_ds.blocks import BlockConfig, build_block_layout
from dflash_ds.data import collate_batch
from dflash_ds.kinds.dflash import DFlashDraftModel, DFlashDraftObjective, FeatureTap, init_from_target, make_draft_config
from dflash_ds.kinds.dflash.feature_cache import (
    COMPLETE, FeatureCacheError, FeatureManifest, FeatureStore, FeatureWriter, check_disk, open_for_writing,
)
from dflash_ds.loss import LossConfig

B, MASK, IDS = 4, 95, [0, 2]


def _manifest(tokens: int, examples: int, world: int = 1, **kw) -> FeatureManifest:
    base = dict(target={"config_sha256": "c", "weights_sha256": "w", "path": "t"}, layer_ids=IDS, hidden_size=64,
                data_key="d", max_length=64, examples=examples, tokens=tokens, dtype="float32", with_final=True,
                world_size=world, data_paths=["data.jsonl"])
    return FeatureManifest(**{**base, **kw})


def _example_rows(target, tap, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One example's ``(features [n, K*H], final [n, H])``, as dflash-ds features computes them."""
    with torch.no_grad(), tap.recording():
        out = target.model(input_ids=torch.tensor([ids]), use_cache=False)
        return tap.take(IDS)[0], out.last_hidden_state[0]


def _write(root: Path, target, examples: list[list[int]], world: int = 1) -> FeatureStore:
    """The pass of dflash-ds features, in process: every example's tapped layers and final hidden state."""
    manifest = _manifest(sum(map(len, examples)), len(examples), world)
    open_for_writing(root, manifest)
    tap = FeatureTap.of(target, IDS)
    for rank in range(world):
        writer = FeatureWriter(root, rank, manifest)
        for i in range(rank, len(examples), world):
            writer.append(i, *_example_rows(target, tap, examples[i]), flush=False)
        writer.close()
    (root / COMPLETE).write_text("")
    return FeatureStore(root)


def _objectives(features):
    target = tiny_model("qwen3", num_hidden_layers=4, seed=1)
    torch.manual_seed(2)
    drafter = DFlashDraftModel(make_draft_config(target.config, 2, IDS, block_size=B, mask_token_id=MASK))
    init_from_target(drafter, target)
    loss = LossConfig(kl_weight=0.5)
    online = DFlashDraftObjective(target, drafter, loss)
    offline = DFlashDraftObjective(target, drafter, loss, features=features)
    return target, online, offline


def test_one_step_from_stored_features_equals_one_step_online(tmp_path):
    """fp32, a right-padded micro-batch of two examples of different lengths, in an order other than the writer's:
    the same loss and the same drafter gradients within 1e-6."""
    gen = torch.Generator().manual_seed(0)
    examples = [torch.randint(0, 90, (n,), generator=gen).tolist() for n in (19, 11, 16)]
    target, online, _ = _objectives(None)
    store = _write(tmp_path / "f", target, examples, world=2)  # two ranks' files
    _, _, offline = _objectives(store)
    offline.drafter.load_state_dict(online.drafter.state_dict())
    picked = [2, 1]
    batch = collate_batch([{"input_ids": examples[i], "loss_mask": [0] * 3 + [1] * (len(examples[i]) - 3)}
                           for i in picked], pad_token_id=0)
    layout = build_block_layout(batch["input_ids"], batch["loss_mask"], batch["attention_mask"],
                                BlockConfig(block_size=B, mask_token_id=MASK), [5, 6])
    outs, grads = [], []
    for objective, kw in ((online, {}), (offline, {"examples": picked})):
        objective.drafter.zero_grad()
        out = objective(batch["input_ids"], batch["attention_mask"], layout, **kw)
        out.loss.backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in objective.drafter.parameters()])
    assert outs[0].supervised_rows > 0 and outs[0].kl > 0
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[1].kl, outs[0].kl, rtol=0, atol=1e-6)
    for g_on, g_off in zip(*grads):
        torch.testing.assert_close(g_off, g_on, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="dataset indices"):
        offline(batch["input_ids"], batch["attention_mask"], layout)
    with pytest.raises(FeatureCacheError, match="no rows for training example 7"):
        store.batch([7], 20, "cpu", True)


def test_manifest_mismatches_name_the_flag_and_bad_directories_are_clear(tmp_path, monkeypatch):
    ours = _manifest(100, 4)
    for change, flag in ((dict(layer_ids=[1, 2]), "--target-layer-ids"), (dict(data_key="other"), "--train-data"),
                         (dict(target={"config_sha256": "x", "weights_sha256": "w", "path": "u"}), "--model-path"),
                         (dict(dtype="bfloat16"), "trains in float32"), (dict(with_final=False), "--kl-weight")):
        theirs = _manifest(100, 4, **change)
        with pytest.raises(FeatureCacheError, match=flag):
            theirs.check_against(ours, "F")
    _manifest(100, 4, with_final=True).check_against(_manifest(100, 4, with_final=False), "F")  # extra teacher: fine

    with pytest.raises(FeatureCacheError, match="no manifest.json"):
        FeatureStore(tmp_path / "nothing")
    open_for_writing(tmp_path / "half", ours)
    with pytest.raises(FeatureCacheError, match="incomplete"):
        FeatureStore(tmp_path / "half")
    with pytest.raises(FeatureCacheError, match="features of another run"):
        open_for_writing(tmp_path / "half", _manifest(100, 5))

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 0, 1000))
    with pytest.raises(FeatureCacheError, match="only 0.00 GiB free"):
        check_disk(tmp_path / "half", ours)  # 100 tokens x 3 x 64 floats = 76.8 kB > 1 kB free


def test_a_killed_pass_resumes_to_the_same_bytes(tmp_path):
    gen = torch.Generator().manual_seed(1)
    examples = [torch.randint(0, 90, (n,), generator=gen).tolist() for n in (7, 9, 5, 8)]
    target = tiny_model("qwen3", num_hidden_layers=4, seed=1)
    full = _write(tmp_path / "full", target, examples)
    manifest = _manifest(sum(map(len, examples)), len(examples))
    root = tmp_path / "killed"
    open_for_writing(root, manifest)
    tap = FeatureTap.of(target, IDS)
    writer = FeatureWriter(root, 0, manifest)
    for i in range(3):  # examples 0, 1 recorded (flushed at 1); example 2's rows written, its index entry lost
        writer.append(i, *_example_rows(target, tap, examples[i]), flush=i == 1)
    junk = torch.full((len(examples[3]) + 5, 2 * 64), 7.0)  # and part of what came after, unrecorded
    writer.feat.write(junk.numpy().tobytes())
    writer.feat.flush()
    writer.final.flush()  # the process dies here: the rows are on disk, the index says 2 examples
    assert (root / "rank0.features.bin").stat().st_size == (sum(map(len, examples)) + 5) * 2 * 64 * 4
    resumed = FeatureWriter(root, 0, manifest)
    assert resumed.done() == {0, 1} and resumed.rows == len(examples[0]) + len(examples[1])
    for i in (2, 3):
        resumed.append(i, *_example_rows(target, tap, examples[i]), flush=False)
    resumed.close()
    for name in ("rank0.features.bin", "rank0.final.bin", "rank0.index.json"):
        assert (root / name).read_bytes() == (full.root / name).read_bytes(), name
