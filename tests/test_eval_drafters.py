"""``dflash-ds eval`` with several drafters of either kind side by side, through one seam: the artifact seam
(dflash_ds/speculative/artifact.py: a directory's kind, its description, LoRA adapters swapped on one model), the
standalone DFlash drafter's rows beside a LoRA adapter's (lossless, kind/layers/parameters, τ and acceptance by
position per drafter), --benchmark and --plot with two drafters, and the static cache for both kinds."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from dflash_ds.kinds.dflash import (
    dflash_generate,
    DFlashDraftModel,
    init_from_target,
    make_draft_config,
    save_dflash_draft,
)
from dflash_ds.evaluate import EvalConfig, main, render_prompt, run_eval
from dflash_ds.kinds import describe, DrafterDirError, load_drafters, open_drafter, open_drafters, standalone_drafter
from dflash_ds.lora import (
    DraftMeta,
    LoRAConfig,
    apply_lora,
    gather_full_lora_state,
    load_adapter_dir,
    lora_modules,
    save_adapter_dir,
    stack_projections,
)
from dflash_ds.kinds.lora import LoRABank

from test_evaluate import CONVERSATIONS, QUESTIONS, tiny_tokenizer

LORA_BLOCK, DFLASH_BLOCK, NEW = 4, 5, 24


def target_model(vocab: int) -> Qwen3ForCausalLM:
    """4 layers (a standalone drafter taps layers 1 and 2: the last layer's HF feature is post-norm). Seed 2: the
    drafter initialised from it accepts some of its tokens (τ > 1)."""
    torch.manual_seed(2)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
        eos_token_id=2, pad_token_id=0, bos_token_id=None)).float().eval()


def save_lora(model_dir, out, config: LoRAConfig, mask_id: int, seed: int) -> dict:
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    apply_lora(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05)
    state = gather_full_lora_state(model)
    save_adapter_dir(out, state, config, DraftMeta(LORA_BLOCK, mask_id, "block", base_model=str(model_dir)))
    return state


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """On disk: the target, three LoRA adapters (two of one shape with different alphas, one of rank 2 on q/v
    only), a standalone drafter initialised from the target's layers, prompts and questions."""
    d = tmp_path_factory.mktemp("drafters")
    tok = tiny_tokenizer()
    mask = tok.convert_tokens_to_ids("<|mask|>")
    target = target_model(len(tok) + 8)
    target.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    states = {
        "lora": save_lora(d / "model", d / "lora", LoRAConfig(r=4, alpha=8), mask, seed=1),
        "lora_b": save_lora(d / "model", d / "lora_b", LoRAConfig(r=4, alpha=16), mask, seed=3),
        "lora_qv": save_lora(d / "model", d / "lora_qv", LoRAConfig(r=2, alpha=8, target_modules=("q_proj", "v_proj")),
                             mask, seed=4),
    }
    torch.manual_seed(7)
    draft = DFlashDraftModel(make_draft_config(target.config, 2, target_layer_ids=[1, 2], block_size=DFLASH_BLOCK,
                                               mask_token_id=mask)).eval()
    init_from_target(draft, target)
    save_dflash_draft(draft, d / "dflash", target_config=target.config)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"conversations": c}) + "\n" for c in CONVERSATIONS))
    (d / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return d, tok, states, draft


# --------------------------------------------------------------------------------------------------------------
# the seam: a directory's kind, what it is, clear errors


def test_open_drafter_says_the_kind_and_describes_it(saved, tmp_path):
    d, _, states, draft = saved
    lora, standalone = open_drafter(d / "lora"), open_drafter(d / "dflash")
    assert (lora.kind, standalone.kind) == ("lora", "dflash")
    assert json.loads((d / "lora" / "dflash.json").read_text())["kind"] == "lora"  # written by save_adapter_dir
    info = describe(lora)
    assert info["layers"] == "r4 over 4 target layers" and info["rank"] == 4 and info["target_layers"] == 4
    assert info["parameters"] == sum(t.numel() for t in states["lora"].values())
    info = describe(standalone)
    assert info["layers"] == "2 draft layers" and info["target_layer_ids"] == [1, 2]
    assert info["parameters"] == sum(p.numel() for p in draft.parameters())
    assert info["block_size"] == DFLASH_BLOCK and standalone.meta.mask_token_id == draft.mask_token_id
    assert describe(open_drafter(d / "lora_qv"))["layers"] == "r2 over 4 target layers"
    # each kind resolves the eval's settings for its drafter: the standalone kind's one loop, any B in [2, trained]
    cfg = EvalConfig(block_size=3).resolved(standalone.meta, "dflash")
    assert (cfg.loop, cfg.block_size, cfg.prompt_lookup_tokens) == ("dflash", 3, 2)
    with pytest.raises(ValueError, match=rf"dflash: --block-size must be in \[2, {DFLASH_BLOCK}\]"):
        EvalConfig(block_size=DFLASH_BLOCK + 1).resolved(standalone.meta, "dflash")
    assert EvalConfig().resolved(lora.meta).loop == "both"  # a scope-block adapter: both of its loops

    # a dflash.json from before the kind field: the LoRA kind
    old = tmp_path / "old"
    old.mkdir()
    for f in (d / "lora").iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    meta = json.loads((old / "dflash.json").read_text())
    del meta["kind"]
    (old / "dflash.json").write_text(json.dumps(meta))
    assert open_drafter(old).kind == "lora" and open_drafter(old).meta.kind == "lora"
    (old / "dflash.json").write_text(json.dumps({**meta, "kind": "dflash"}))
    with pytest.raises(DrafterDirError, match="kind 'dflash'"):
        open_drafter(old)


def test_a_directory_of_neither_kind_is_a_clear_error(saved, tmp_path, capsys):
    d, *_ = saved
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DrafterDirError) as err:
        open_drafter(empty)
    assert str(err.value).startswith(f"{empty}: no dflash.json and no config.json; a drafter directory is one of")
    with pytest.raises(DrafterDirError, match=r"Qwen3ForCausalLM \(a target model\? pass it as --model-path\)"):
        open_drafter(d / "model")
    with pytest.raises(FileNotFoundError, match="drafter directory not found"):
        open_drafter(tmp_path / "nowhere")
    with pytest.raises(DrafterDirError, match="pass a standalone drafter as --drafter"):
        open_drafter(d / "dflash", expect="lora")
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = json.loads((d / "dflash" / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DrafterDirError, match="model.safetensors: missing"):
        open_drafter(broken)
    (broken / "model.safetensors").write_bytes((d / "dflash" / "model.safetensors").read_bytes())
    (broken / "config.json").write_text(json.dumps({**cfg, "dflash_config": {"target_layer_ids": [1, 2]}}))
    with pytest.raises(DrafterDirError, match="no dflash_config.mask_token_id"):
        open_drafter(broken)

    # the command: exit 2 naming the path, before the model loads; --adapter takes LoRA adapters only
    for flag, path, message in (("--drafter", empty, f"{empty}: no dflash.json and no config.json"),
                                ("--adapter", d / "dflash", "a dflash drafter where a lora one is expected")):
        rc = main(["--model-path", str(d / "model"), flag, str(path), "--prompts", str(d / "prompts.jsonl"),
                   "--report", str(tmp_path / "r.json"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, err
    with pytest.raises(SystemExit):
        main(["--model-path", str(d / "model"), "--prompts", str(d / "prompts.jsonl"), "--report", "r.json"])
    assert "one of the arguments --drafter --adapter is required" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# side by side in one run


def test_lora_and_standalone_side_by_side(saved, tmp_path, capsys):
    """One command, a LoRA adapter (--adapter) and a standalone drafter (--drafter): both rows lossless, each with
    its kind, layers and parameters, τ and acceptance by position over its own block; one AR baseline."""
    d, tok, _, draft = saved
    report_path = tmp_path / "report.json"
    rc = main(["--model-path", str(d / "model"), "--adapter", str(d / "lora"), "--drafter", str(d / "dflash"),
               "--prompts", str(d / "prompts.jsonl"), "--max-new-tokens", str(NEW), "--repeats", "2",
               "--report", str(report_path), "--no-progress"])
    assert rc == 0
    report = json.loads(report_path.read_text())
    drafters = report["drafters"]
    assert list(drafters) == ["drafter", "drafter_other_loop", "drafter_2"]  # a scope-block adapter: both loops
    assert [r["method"] for r in report["table"]] == [
        "drafter", "drafter_other_loop", "drafter_2", "prompt_lookup_hf", "untrained_floor", "autoregressive"]
    assert set(report["baselines"]) == {"drafter_other_loop", "prompt_lookup_hf", "untrained_floor"}
    lora, standalone = drafters["drafter"], drafters["drafter_2"]
    assert (lora["kind"], lora["layers"], lora["name"]) == ("lora", "r4 over 4 target layers", "lora")
    assert (standalone["kind"], standalone["layers"], standalone["name"]) == ("dflash", "2 draft layers", "dflash")
    assert standalone["parameters"] == sum(p.numel() for p in draft.parameters())
    assert standalone["loop"] == "dflash" and standalone["block_size"] == DFLASH_BLOCK
    for key, e in drafters.items():
        assert e["greedy_match"] is True and e["mismatched_prompts"] == [], key
        assert e["speedup_over"] == "autoregressive"
        assert e["speedup"] == pytest.approx(e["tokens_per_s"] / report["ar_tokens_per_s"])
        assert len(e["acceptance_by_position"]) == e["block_size"] - 1
        h = e["tau_histogram"]
        assert e["tau"] == pytest.approx(sum(int(k) * v for k, v in h.items()) / sum(h.values()))
        assert set(h) == {str(k) for k in range(1, e["block_size"] + 1)}
    assert standalone["tau"] > 1.1, standalone["tau"]  # initialised from the target: it drafts some of its tokens
    # the headline is the first drafter, as with one drafter
    assert report["tau"] == lora["tau"] and report["greedy_match"] is True and report["config"]["num_drafters"] == 2
    assert report["config"]["drafters"] == [str(d / "lora"), str(d / "dflash")]
    for row in report["table"][:3]:
        assert row["kind"] in ("lora", "dflash") and row["layers"] and row["parameters"] > 0
        assert f"[{row['kind']}, {row['layers']}, " in row["label"]
    for p in report["per_prompt"]:
        assert all(v["match"] for v in p["drafters"].values())
    # the standalone row decoded exactly what dflash_generate does with the drafter alone
    target = Qwen3ForCausalLM.from_pretrained(d / "model", dtype=torch.float32).eval()
    for conv, p in zip(CONVERSATIONS, report["per_prompt"]):
        r = dflash_generate(target, draft, render_prompt(tok, conv), NEW, eos_token_ids=report["config"]["eos_token_ids"])
        assert r.output_ids == p["ar_ids"] and r.tau == pytest.approx(p["drafters"]["drafter_2"]["tau"])
    out = capsys.readouterr().out
    assert "drafters (speedups over the one autoregressive baseline above):" in out
    assert "drafter_2: dflash, dflash, 2 draft layers" in out and standalone["label"] in out


def _alone(d, name, tok, cfg):
    """One adapter on a fresh model (stacked, as the command runs it): the reference for the shared model."""
    model = Qwen3ForCausalLM.from_pretrained(d / "model", dtype=torch.float32).eval()
    meta = load_adapter_dir(model, d / name, stack=True)
    return run_eval(model, tok, meta, CONVERSATIONS, cfg, progress=False, warmup=False)


def test_several_lora_adapters_swap_on_one_model(saved):
    """Three adapters (two shapes) and a standalone drafter on ONE model: each adapter drafts exactly as it does
    alone on its own model (its factors swapped in, stacked projections refreshed, alpha folded, the rank-2 one
    zero-padded), and the first adapter is the model's again afterwards."""
    d, tok, _, draft = saved
    model = Qwen3ForCausalLM.from_pretrained(d / "model", dtype=torch.float32).eval()
    drafters = load_drafters(model, open_drafters([("lora", d / "lora"), (None, d / "lora_b"),
                                                   (None, d / "lora_qv"), (None, d / "dflash")]))
    stack_projections(model)
    bank = drafters[0].holder
    assert isinstance(bank, LoRABank) and bank.padded == [False, False, True] and bank.config.r == 4
    cfg = EvalConfig(max_new_tokens=NEW, repeats=1, baselines="none", loop="two_forward")
    report = run_eval(model, tok, drafters, CONVERSATIONS, cfg, progress=False, warmup=False)
    assert bank.active == 0
    assert [r["method"] for r in report["table"]] == ["drafter", "drafter_2", "drafter_3", "drafter_4",
                                                      "autoregressive"]
    assert "padded_to" in report["drafters"]["drafter_3"] and "padded_to" not in report["drafters"]["drafter"]
    for key, name in (("drafter", "lora"), ("drafter_2", "lora_b"), ("drafter_3", "lora_qv")):
        alone = _alone(d, name, tok, cfg)
        e = report["drafters"][key]
        assert e["greedy_match"] is True
        assert e["tau_histogram"] == alone["tau_histogram"], name
        assert e["acceptance_by_position"] == alone["acceptance_by_position"], name
        assert [p["drafters"][key]["tau"] for p in report["per_prompt"]] == [p["tau"] for p in alone["per_prompt"]]
    taus = {report["drafters"][k]["tau"] for k in ("drafter", "drafter_2", "drafter_3")}
    assert len(taus) > 1  # different adapters really drafted differently

    # an in-memory standalone drafter (the trainer's kind of call), first: the headline's loop and scope
    solo = run_eval(model, tok, standalone_drafter(draft), CONVERSATIONS[:2], cfg, progress=False, warmup=False)
    assert solo["loop"] == "dflash" and solo["config"]["scope"] is None and solo["greedy_match"] is True
    assert solo["drafters"]["drafter"]["kind"] == "dflash" and solo["drafters"]["drafter"]["layers"] == "2 draft layers"


def test_benchmark_and_plots_with_two_drafters(saved, tmp_path, capsys):
    """--benchmark with a LoRA adapter and a standalone drafter of another block size: per-category sections for
    both (acceptance over each one's own block), the printed per-category table, and plots with one series per
    drafter."""
    from dflash_ds import plots

    from test_plots import png_size

    pytest.importorskip("matplotlib")
    d, *_ = saved
    plot_dir = tmp_path / "plots"
    rc = main(["--model-path", str(d / "model"), "--adapter", str(d / "lora"), "--drafter", str(d / "dflash"),
               "--benchmark", str(d / "question.jsonl"), "--max-new-tokens", "12", "--repeats", "2",
               "--loop", "two_forward", "--report", str(tmp_path / "report.json"), "--plot", str(plot_dir),
               "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    bench = report["benchmark"]
    methods = ["autoregressive", "drafter", "drafter_2", "prompt_lookup_hf", "untrained_floor"]
    for group in ("writing", "coding", "turn 1", "turn 2"):
        stats = bench["by_category"].get(group) or bench["by_turn"][group]
        assert list(stats) == methods, group
        assert len(stats["drafter"]["acceptance_by_position"]) == LORA_BLOCK - 1
        assert len(stats["drafter_2"]["acceptance_by_position"]) == DFLASH_BLOCK - 1
    for key in ("drafter", "drafter_2"):
        assert bench["overall"][key]["tau"] == pytest.approx(report["drafters"][key]["tau"])
        assert bench["overall"][key]["speedup"] == pytest.approx(report["drafters"][key]["speedup"])
        assert bench["labels"][key] == report["drafters"][key]["label"]
    out = capsys.readouterr().out
    assert report["drafters"]["drafter_2"]["label"] in out.split("\n\n", 1)[1]  # a row of the per-category table

    labels = [report["drafters"][k]["label"] for k in ("drafter", "drafter_2")]
    ax = plots.figure_acceptance(report).axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(labels) <= set(lines)
    assert len(lines[labels[1]].get_xdata()) == DFLASH_BLOCK - 1
    bars = plots.figure_speedup(report).axes[0]
    assert [t.get_text() for t in bars.get_xticklabels()][:2] == labels
    tau_labels = [t.get_text() for t in plots.figure_tau(report).axes[0].get_legend().get_texts()]
    assert tau_labels[:2] == labels
    for name in ("acceptance_by_position.png", "tau_per_category.png", "speedup.png", "speedup_per_category.png"):
        w, h = png_size(plot_dir / name)
        assert w >= 600 and h >= 400


@pytest.mark.slow
def test_static_cache_and_compiled_forwards_serve_both_kinds(saved):
    """--compile static / compile: the standalone drafter's verify forwards on the shared static cache (its tap
    installed before the cache, traced into the compiled decoder), two LoRA adapters swapped under the same compiled
    graphs: every row lossless and drafting as on the dynamic cache, one graph per kind of forward."""
    import torch._dynamo

    d, tok, *_ = saved
    model = Qwen3ForCausalLM.from_pretrained(d / "model", dtype=torch.float32).eval()
    drafters = load_drafters(model, open_drafters([(None, d / "dflash"), (None, d / "lora"), (None, d / "lora_b")]))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    reports = {}
    for compile_ in ("none", "static", "compile"):
        cfg = EvalConfig(max_new_tokens=NEW, repeats=1, baselines="none", loop="two_forward", compile=compile_)
        reports[compile_] = run_eval(model, tok, drafters, CONVERSATIONS, cfg, progress=False,
                                     warmup=compile_ == "compile")
    for compile_ in ("static", "compile"):
        for key in ("drafter", "drafter_2", "drafter_3"):
            dyn, other = reports["none"]["drafters"][key], reports[compile_]["drafters"][key]
            assert other["greedy_match"] is True and other["tau_histogram"] == dyn["tau_histogram"], (compile_, key)
    assert reports["static"]["config"]["compile"] == "static" and reports["static"]["loop"] == "dflash"
    # AR, the LoRA draft and verify forwards (B=4), the standalone's verify forward (B=5, tap on): measured 5
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 3 <= graphs <= 6, graphs  # at least one per kind of forward: the compiled path really compiled
    # sampling: every drafter row samples (lossless rejection sampling; an EOS may end an answer early)
    sampled = run_eval(model, tok, drafters, CONVERSATIONS[:2], EvalConfig(max_new_tokens=8, repeats=1,
                       baselines="none", temperature=0.8), progress=False, warmup=False)
    for e in sampled["drafters"].values():
        tokens = sum(int(k) * v for k, v in e["tau_histogram"].items())
        steps = sum(e["tau_histogram"].values())
        assert e["greedy_match"] is None and 2 <= tokens <= 16
        # tau is the histogram's mean (tokens per verify step), within a block's reach
        assert e["tau"] == pytest.approx(tokens / steps) and 1 <= e["tau"] <= max(map(int, e["tau_histogram"]))
