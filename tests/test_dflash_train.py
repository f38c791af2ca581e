"""The standalone DFlash drafter trained by ``dflash_ds.train --drafter dflash`` (dflash_ds/drafters.py): its loss
falls, every parallel layout reproduces the single process (losses and the exported drafter), resume is exact (also
into another layout), a checkpoint of another kind is refused, and the export is the published format holding the
trained weights.

Runs are real launcher runs on a 4-layer tiny target, 3 steps each (tests/test_distributed.py's helpers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_conversations, write_tiny_target
from ranks import run_ranks
from test_distributed import ROOT, dist_env, metrics, run_train, train_args

pytestmark = pytest.mark.slow  # multi-rank / subprocess runs: left out of the fast subset (-m "not slow")

STEPS = 3
# two draft layers reading two target layers (the fused features go through fc), initialised from the target
DFLASH_FLAGS = ["--drafter", "dflash", "--draft-layers", "2", "--target-layer-ids", "0", "2", "--max-steps", str(STEPS)]


def dflash_run(assets, out, nproc=1, config=None, extra=(), **kw):
    return run_train(assets, out, nproc=nproc, config=config, extra=[*DFLASH_FLAGS, *extra], **kw)


def drafter_weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "drafter" / "model.safetensors"))


def assert_same_dflash_run(ref_out, out, start: dict[str, torch.Tensor], rel=1e-4):
    """The same losses, and the same trained drafter to fp32 round-off: per tensor, the difference from the
    reference is under 1e-3 of what training moved it (``start``: the initial drafter). Not elementwise: a layout
    changes the features' rounding (TP's partial sums, ZeRO's reductions), and Adam divides each gradient by its
    own magnitude, so a weight whose gradient is near zero can move by a few % of a step either way (measured:
    TP x2 moves 2 of 8192 weights by up to 9e-5, lr 5e-3; the tensors' relative difference is at most 1.2e-4)."""
    ref_m, m = metrics(ref_out), metrics(out)
    assert [r["step"] for r in ref_m] == [r["step"] for r in m] == list(range(1, STEPS + 1))
    for a, b in zip(ref_m, m):
        assert b["loss"] == pytest.approx(a["loss"], rel=rel), (a, b)
    ref_w, w = drafter_weights(ref_out), drafter_weights(out)
    assert ref_w.keys() == w.keys() == start.keys()
    for k in ref_w:
        moved = (ref_w[k] - start[k]).norm()
        assert moved > 0, k
        assert (w[k] - ref_w[k]).norm() <= 1e-3 * moved, (k, float((w[k] - ref_w[k]).norm() / moved))
        assert (w[k] - ref_w[k]).abs().max() <= 5e-4, k


def test_drafter_flags_and_their_checks():
    """--drafter/--draft-layers/--target-layer-ids/--draft-init: defaults (the LoRA kind, one draft layer, the
    published rule, init from the target), and a drafter the target cannot take names its flags."""
    from conftest import tiny_config
    from dflash_ds.config import DrafterConfig, parse_train_args

    base = ["--model-path", "m", "--output-dir", "o", "--train-data", "d.jsonl"]
    cfg = parse_train_args(base).drafter
    assert (cfg.kind, cfg.layers, cfg.target_layer_ids, cfg.init) == ("lora", 1, None, "target")
    cfg = parse_train_args([*base, *DFLASH_FLAGS, "--draft-init", "random"]).drafter
    assert (cfg.kind, cfg.layers, cfg.target_layer_ids, cfg.init) == ("dflash", 2, (0, 2), "random")
    target = tiny_config("qwen3", num_hidden_layers=4)
    assert DrafterConfig(kind="dflash").draft_config(target, 4, 3).dflash_config == {"mask_token_id": 3,
                                                                                     "target_layer_ids": [2]}
    with pytest.raises(ValueError, match=r"--target-layer-ids \[3\]\): target_layer_ids \[3\] out of range"):
        DrafterConfig(kind="dflash", target_layer_ids=(3,)).draft_config(target, 4, 3)
    with pytest.raises(ValueError, match="--draft-init target copies the target's last --draft-layers layers: 5"):
        DrafterConfig(kind="dflash", layers=5).draft_config(target, 4, 3)
    DrafterConfig(kind="dflash", layers=5, init="random", target_layer_ids=(0, 1)).draft_config(target, 4, 3)
    with pytest.raises(ValueError, match="--draft-layers must be >= 1"):
        DrafterConfig(layers=0)
    # the draft vocabulary's flags: only with a draft vocabulary, only for the standalone kind
    with pytest.raises(ValueError, match="--draft-head trained needs --draft-vocab N"):
        DrafterConfig(kind="dflash", draft_head="trained")
    with pytest.raises(ValueError, match="--draft-vocab-outside drop needs --draft-vocab N"):
        DrafterConfig(kind="dflash", draft_vocab_outside="drop")
    with pytest.raises(ValueError, match="--draft-vocab is a standalone-drafter flag: it needs --drafter dflash"):
        parse_train_args([*base, "--draft-vocab", "100"])
    with pytest.raises(ValueError, match="--draft-vocab must be >= 1"):
        DrafterConfig(kind="dflash", draft_vocab=0)


@pytest.fixture(scope="module")
def dflash_assets(tmp_path_factory):
    """A 4-layer target: the feature layers ids must lie in [0, N-2] (the last layer's HF output is post-norm)."""
    d = tmp_path_factory.mktemp("dflash_assets")
    write_tiny_target(d / "model", num_hidden_layers=4)
    write_conversations(d / "data.jsonl", n=24)
    return d


def _init_drafter(assets):
    """The drafter the run starts from, built here as the trainer does (seed 3, copied from the target)."""
    from transformers import AutoModelForCausalLM

    from dflash_ds.kinds.dflash import DFlashDraftModel, init_from_target, make_draft_config

    target = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32)
    torch.manual_seed(3)
    drafter = DFlashDraftModel(make_draft_config(target.config, 2, [0, 2], block_size=4, mask_token_id=3))
    init_from_target(drafter, target, [2, 3])
    return drafter


@pytest.fixture(scope="module")
def dflash_start(dflash_assets) -> dict[str, torch.Tensor]:
    return _init_drafter(dflash_assets).state_dict()


@pytest.fixture(scope="module")
def dflash_reference(dflash_assets, tmp_path_factory):
    """One process, global batch 2 by gradient accumulation: what every layout must reproduce."""
    out = tmp_path_factory.mktemp("dflash_ref")
    dflash_run(dflash_assets, out, extra=["--grad-accum", "2"])
    return out


def test_the_drafter_trains_and_its_loss_falls(dflash_start, dflash_reference):
    m = metrics(dflash_reference)
    assert [r["step"] for r in m] == [1, 2, 3]
    assert m[-1]["loss"] < m[0]["loss"], "training did not lower the loss: parity would prove nothing"
    start, trained = dflash_start, drafter_weights(dflash_reference)
    assert start.keys() == trained.keys()
    moved = max((trained[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3, "the drafter did not move"
    # only the drafter trains: the LoRA kind's artifact is not written, the target is not in the checkpoint
    assert not (dflash_reference / "adapter").exists()
    state = torch.load(dflash_reference / "checkpoints" / f"step_{STEPS:08d}" / "dflash_state.pt", weights_only=False)
    assert state["drafter_kind"] == "dflash" and "adapter" not in state and "lora_config" not in state
    assert set(state["drafter"]) == set(start) == set(state["optimizer"])


@pytest.mark.parametrize(
    "config,extra",
    [
        ("zero2.json", []),
        ("zero3.json", ["--gradient-checkpointing"]),  # the target partitioned, the drafter's layers recomputed
        ("autotp2_zero1.json", ["--grad-accum", "2"]),  # the target sharded, the drafter replicated
    ],
    ids=["zero2", "zero3", "autotp2"],
)
def test_parallel_layouts_match_single_process(dflash_assets, dflash_start, dflash_reference, tmp_path, config,
                                               extra):
    dflash_run(dflash_assets, tmp_path, nproc=2, config=config, extra=extra)
    assert_same_dflash_run(dflash_reference, tmp_path, dflash_start)
    if config.startswith("autotp"):
        # the two TP ranks' replicas of the drafter are bit-identical (DeepSpeed saves one module file per TP rank)
        ckpt = tmp_path / "checkpoints" / f"step_{STEPS:08d}"
        a, b = (torch.load(ckpt / f"mp_rank_0{r}_model_states.pt", weights_only=False)["module"] for r in (0, 1))
        assert a.keys() == b.keys() and any(k.startswith("drafter.layers.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), "the TP replicas of the drafter diverged"


@pytest.mark.parametrize("resume_on", [(1, None), (2, "zero3.json")], ids=["same_layout", "into_zero3"])
def test_kill_after_checkpoint_then_resume_matches(dflash_assets, dflash_start, dflash_reference, tmp_path,
                                                    resume_on):
    """Killed after step 2's checkpoint (one process), resumed on the same layout (DeepSpeed's own files) or on
    ZeRO-3 x2 (the gathered weights and Adam moments restored into the partitions): step 3 is the uninterrupted
    run's."""
    extra = ["--save-interval", "2"]
    proc = dflash_run(dflash_assets, tmp_path, extra=[*extra, "--grad-accum", "2"],
                      env_extra={"DFLASH_DS_TEST_KILL_AFTER_STEP": "2"}, check=False)
    assert proc.returncode != 0 and (tmp_path / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    assert not (tmp_path / "drafter").exists()
    nproc, config = resume_on
    accum = ["--grad-accum", "2"] if nproc == 1 else []
    proc = dflash_run(dflash_assets, tmp_path, nproc=nproc, config=config, extra=[*extra, *accum, "--resume", "auto"])
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert_same_dflash_run(dflash_reference, tmp_path, dflash_start)


@pytest.fixture(scope="module")
def dflash_features(dflash_assets, tmp_path_factory):
    """``dflash-ds features`` with the reference run's flags, sharded over 2 ranks."""
    root = tmp_path_factory.mktemp("features") / "f"
    args = train_args(dflash_assets, root.parent / "out", extra=[*DFLASH_FLAGS, "--features", str(root)])
    proc = run_ranks(2, "dflash_ds.features", args, dist_env(), ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GiB" in proc.stderr and (root / "COMPLETE").exists()  # the disk it takes, said before writing
    return root


@pytest.mark.parametrize("nproc,config", [(1, None), (2, "zero2.json"), (2, "zero3.json")],
                         ids=["one_process", "zero2", "zero3"])
def test_training_from_offline_features_matches_the_online_run(dflash_assets, dflash_start, dflash_reference,
                                                               dflash_features, tmp_path, nproc, config):
    """--features DIR: the target's decoder layers never run, and the run is the online one's."""
    extra = ["--features", str(dflash_features), *(["--grad-accum", "2"] if nproc == 1 else [])]
    dflash_run(dflash_assets, tmp_path, nproc=nproc, config=config, extra=extra)
    assert_same_dflash_run(dflash_reference, tmp_path, dflash_start, rel=1e-5)


def test_offline_features_of_another_run_are_refused(dflash_assets, dflash_features, tmp_path):
    """Features written for other layer ids, --features without --drafter dflash, or the features pass without
    --features: exit 2 naming the flag, nothing trained."""
    cases = [
        ("dflash_ds.train", [*DFLASH_FLAGS, "--target-layer-ids", "1", "2", "--features", str(dflash_features)],
         "made for target layers [0, 2], this run reads [1, 2]: --target-layer-ids"),
        ("dflash_ds.features", ["--features", str(tmp_path / "f")],
         "--features is a standalone-drafter flag: it needs --drafter dflash (this run trains --drafter lora)"),
        ("dflash_ds.features", DFLASH_FLAGS, "needs --drafter dflash and --features DIR"),
    ]
    for i, (module, flags, message) in enumerate(cases):
        out = tmp_path / f"{module}.{i}"
        proc = run_ranks(1, module, train_args(dflash_assets, out, extra=flags), dist_env(), ROOT, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert message in proc.stderr, proc.stderr[-3000:]
        assert not (out / "metrics.jsonl").exists()


def test_resume_with_another_drafter_kind_or_shape_is_refused(dflash_assets, dflash_reference, tmp_path):
    ckpt = dflash_reference / "checkpoints" / f"step_{STEPS:08d}"
    cases = [
        (["--drafter", "lora"], "the checkpoint trained a 'dflash' drafter, this run trains --drafter lora: resume "
                                "with --drafter dflash"),
        ([*DFLASH_FLAGS, "--draft-layers", "1"], "resume with --draft-layers 2 --target-layer-ids 0 2"),
    ]
    for flags, message in cases:
        out = tmp_path / flags[1]
        proc = run_ranks(1, "dflash_ds.train", train_args(dflash_assets, out, extra=[*flags, "--resume", str(ckpt)]),
                         dist_env(), ROOT, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert message in proc.stderr, proc.stderr[-3000:]
        assert not (out / "metrics.jsonl").exists()  # refused before the run started


def test_export_is_the_published_format_holding_the_trained_weights(dflash_reference, tmp_path):
    from dflash_ds.cli import main
    from dflash_ds.kinds.dflash import load_dflash_draft

    out = dflash_reference / "drafter"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]
    assert (config["block_size"], config["num_target_layers"], config["num_hidden_layers"]) == (4, 4, 2)
    assert config["dflash_config"] == {"mask_token_id": 3, "target_layer_ids": [0, 2]}
    assert config["layer_types"] == ["full_attention"] * 2
    assert config["dflash_ds"]["draft_init"] == "target" and config["base_model"].endswith("model")

    # the trained weights: the checkpoint's gathered drafter and DeepSpeed's own module file, exactly
    ckpt = dflash_reference / "checkpoints" / f"step_{STEPS:08d}"
    gathered = torch.load(ckpt / "dflash_state.pt", weights_only=False)["drafter"]
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    loaded = load_dflash_draft(out).state_dict()
    assert loaded.keys() == gathered.keys() == {k.removeprefix("drafter.") for k in module}
    for k in loaded:
        assert torch.equal(loaded[k], gathered[k]) and torch.equal(loaded[k], module[f"drafter.{k}"]), k

    # dflash-ds export of the latest checkpoint writes the same files
    assert main(["export", str(dflash_reference / "checkpoints"), str(tmp_path / "exp")]) == 0
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "exp" / name).read_bytes() == (out / name).read_bytes(), name


def test_nonfinite_step_is_skipped_and_the_periodic_eval_is_the_offline_eval(dflash_assets, tmp_path):
    """The skipped micro-batch's zero loss reaches the drafter's parameters (the LoRA kind's would be empty here).
    The periodic eval decodes with the in-memory drafter, and its tau is the offline eval's of the same weights
    exported from the checkpoint."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(l) for l in (dflash_assets / "data.jsonl").read_text().splitlines()][:2]
    prompts.write_text("".join(json.dumps({"conversations": r["conversations"][:1]}) + "\n" for r in rows))
    out = tmp_path / "run"
    proc = dflash_run(dflash_assets, out,
                      extra=["--eval-interval", "1", "--eval-prompts", str(prompts), "--eval-max-new-tokens", "6",
                             "--eval-limit", "2", "--save-interval", "1", "--keep-last", "5"],
                      env_extra={"DFLASH_DS_TEST_NAN_AT_STEP": "2"})
    assert "step 2: non-finite loss skipped (1/10)" in proc.stdout
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3] and m[1]["nonfinite_micro_batches"] == 1
    assert all(torch.isfinite(t).all() for t in drafter_weights(out).values())
    assert all(r["eval_tau"] >= 1 and r["eval_speedup"] > 0 for r in m)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dflash_ds.checkpoint import export_checkpoint
    from dflash_ds.kinds.dflash import load_dflash_draft
    from dflash_ds.evaluate import EvalConfig, load_prompts, run_eval
    from dflash_ds.kinds import standalone_drafter

    export_checkpoint(out / "checkpoints" / "step_00000001", tmp_path / "step1")
    target = AutoModelForCausalLM.from_pretrained(dflash_assets / "model", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(dflash_assets / "model")
    draft = load_dflash_draft(tmp_path / "step1")
    offline = run_eval(target, tok, standalone_drafter(draft), load_prompts(prompts, tok, limit=2),
                       EvalConfig(max_new_tokens=6, baselines="none", repeats=1), progress=False)
    assert m[0]["eval_tau"] == pytest.approx(offline["tau"])


# ---------------------------------------------------------------------------------------------------------------
# a draft vocabulary (--draft-vocab): chosen once, trained frozen or with its head, in parallel as on one process

VOCAB_FLAGS = ["--draft-vocab", "60"]


@pytest.fixture(scope="module")
def vocab_reference(dflash_assets, tmp_path_factory):
    """One process, a trained draft head over 60 of the target's tokens."""
    out = tmp_path_factory.mktemp("vocab_ref")
    dflash_run(dflash_assets, out, extra=[*VOCAB_FLAGS, "--draft-head", "trained", "--grad-accum", "2"])
    return out


def _assert_same_vocab_run(ref_out, out):
    for a, b in zip(metrics(ref_out), metrics(out)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    ref_w, w = drafter_weights(ref_out), drafter_weights(out)
    assert ref_w.keys() == w.keys()
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-3, atol=5e-4)


def test_draft_vocabulary_is_chosen_from_the_answers_and_exported_as_vllm_reads_it(dflash_assets, vocab_reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import datasets

    from dflash_ds.kinds.dflash.draft_vocab import build_draft_vocab

    chosen = json.loads((vocab_reference / "draft_vocab.json").read_text())
    tok = AutoTokenizer.from_pretrained(dflash_assets / "model")
    assert len(chosen["ids"]) == 60 and tok.eos_token_id in chosen["ids"] and chosen["keep"] == [tok.eos_token_id]
    assert 0.5 < chosen["coverage_train"] <= 1 and 0 < chosen["coverage_held_out"] <= 1
    # the same choice as the plain function over the run's tokenised data
    (cache,) = (vocab_reference / "data_cache").iterdir()
    vocab, _ = build_draft_vocab(list(datasets.load_from_disk(str(cache))), 60, len(tok), [tok.eos_token_id])
    assert list(vocab.ids) == chosen["ids"]

    config = json.loads((vocab_reference / "drafter" / "config.json").read_text())
    assert config["draft_vocab_size"] == 60 and config["has_own_lm_head"] is True
    assert config["dflash_ds"]["draft_head"] == "trained"
    w, start = drafter_weights(vocab_reference), AutoModelForCausalLM.from_pretrained(dflash_assets / "model")
    assert (w["d2t"] + torch.arange(60)).tolist() == chosen["ids"]
    rows = start.lm_head.weight.detach()[chosen["ids"]]
    assert w["lm_head.weight"].shape == rows.shape and not torch.equal(w["lm_head.weight"], rows)  # it trained
    assert (w["lm_head.weight"] - rows).abs().max() < 0.1


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_trained_draft_head_in_parallel_matches_single_process(dflash_assets, vocab_reference, tmp_path, config):
    """ZeRO-3 partitions the head the loss reads as a tensor (registered external): same losses, same weights."""
    dflash_run(dflash_assets, tmp_path, nproc=2, config=config, extra=[*VOCAB_FLAGS, "--draft-head", "trained"])
    _assert_same_vocab_run(vocab_reference, tmp_path)


def test_frozen_draft_head_stays_the_targets_rows_and_resume_checks_it(dflash_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "frozen"
    dflash_run(dflash_assets, out, nproc=2, config="zero3.json", extra=VOCAB_FLAGS)
    chosen = json.loads((out / "draft_vocab.json").read_text())["ids"]
    w = drafter_weights(out)
    target = AutoModelForCausalLM.from_pretrained(dflash_assets / "model")
    assert torch.equal(w["lm_head.weight"], target.lm_head.weight.detach()[chosen])
    m = metrics(out)
    assert m[-1]["loss"] < m[0]["loss"]
    ckpt = out / "checkpoints" / f"step_{STEPS:08d}"
    proc = run_ranks(1, "dflash_ds.train", train_args(dflash_assets, tmp_path / "r", extra=[
        *DFLASH_FLAGS, *VOCAB_FLAGS, "--draft-head", "trained", "--resume", str(ckpt)]), dist_env(), ROOT, timeout=300)
    assert proc.returncode == 2 and "resume with the checkpoint's" in proc.stderr, proc.stderr[-2000:]
    # the same flags, but the output directory holds another vocabulary of the same size (other data)
    other = tmp_path / "other"
    other.mkdir()
    raw = json.loads((out / "draft_vocab.json").read_text())
    raw["ids"] = sorted(set(raw["ids"][:-1]) | {min(set(range(raw["target_vocab_size"])) - set(raw["ids"]))})
    (other / "draft_vocab.json").write_text(json.dumps(raw))
    proc = run_ranks(1, "dflash_ds.train", train_args(dflash_assets, other, extra=[
        *DFLASH_FLAGS, *VOCAB_FLAGS, "--resume", str(ckpt)]), dist_env(), ROOT, timeout=300)
    assert proc.returncode == 2 and "draft vocabulary is not the one in" in proc.stderr, proc.stderr[-2000:]
