"""Speculative decoding: greedy equality, accounting, lossless sampling, KV cache hygiene."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen3ForCausalLM

from conftest import tiny_config

from dflash_ds.lora import LoRAConfig, apply_lora, lora_modules
from dflash_ds.speculative import (
    Draft,
    accept_greedy,
    accept_greedy_lazy,
    NgramDrafter,
    autoregressive_generate,
    speculative_generate,
)
from dflash_ds.kinds.lora import LoRABlockDrafter
from dflash_ds.kinds import untrained_floor_drafter

MASK = 3
VOCAB = 96


def tiny_model(attn: str = "sdpa", vocab: int = VOCAB, hidden: int = 64, layers: int = 2, seed: int = 0,
               b_std: float = 0.05, logit_scale: float = 1.0, family: str = "qwen3", **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, max_position_embeddings=256, attn_implementation=attn, **overrides)
    model = {"qwen3": Qwen3ForCausalLM, "llama": LlamaForCausalLM}[family](cfg).float().eval()
    if logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, module in lora_modules(model):  # non-zero B: the drafter differs from the base model
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=gen) * b_std)
    model.dflash_adapter.enabled = False
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    model.dflash_adapter.set(False)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(n: int = 2, length: int = 9, vocab: int = VOCAB, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randint(4, vocab, (length,), generator=gen).tolist() for _ in range(n)]
    out.append([7])  # a one-token prompt: nothing to prefill
    return out


@pytest.fixture(scope="module")
def sdpa_model():
    return tiny_model("sdpa")


@pytest.fixture(scope="module")
def eager_model():
    return tiny_model("eager", seed=1)


@pytest.fixture(scope="module")
def llama_model():
    """SmolLM2-shaped (tied lm_head, no q/k norms): the decoder must not depend on the family. A larger init than
    the default: with tied embeddings and small layers, a random model's greedy output repeats its last token."""
    return tiny_model("sdpa", seed=2, family="llama", initializer_range=0.2)


class OracleDrafter:
    """Proposes the target's own greedy continuation (``reference``: prompt + greedy tokens); with ``corrupt``
    one proposed token per step (at a seeded random index) is replaced by a wrong one."""

    name = "oracle"

    def __init__(self, reference: list[int], corrupt: bool = False, wrong: bool = False, seed: int = 0):
        self.reference, self.corrupt, self.wrong = reference, corrupt, wrong
        self.gen = torch.Generator().manual_seed(seed)

    def start(self, session, tokens):
        assert tokens == self.reference[: len(tokens)]

    def propose(self, session, tokens, num, temperature, generator):
        assert tokens == self.reference[: len(tokens)], "committed tokens left the greedy path"
        d = self.reference[len(tokens) : len(tokens) + num]
        if self.wrong:
            d = [(x + 1) % VOCAB for x in d]
        elif self.corrupt and d:
            i = int(torch.randint(len(d), (1,), generator=self.gen))
            d = list(d)
            d[i] = (d[i] + 1) % VOCAB
        return Draft(d)


# ------------------------------------------------------------------------------------------------------------------
# Greedy: token for token equal to transformers' greedy generate
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["block", "all"])
@pytest.mark.parametrize("block_size", [2, 4, 8])
@pytest.mark.parametrize("model_name", ["sdpa", "eager", "llama"])
def test_greedy_equals_generate(scope, block_size, model_name, sdpa_model, eager_model, llama_model):
    model = {"sdpa": sdpa_model, "eager": eager_model, "llama": llama_model}[model_name]
    for prompt in prompts():
        max_new = 3 * block_size + 1  # ends mid-block
        ref = hf_greedy(model, prompt, max_new)
        r = speculative_generate(model, prompt, LoRABlockDrafter(MASK, scope), block_size=block_size,
                                 max_new_tokens=max_new, eos_token_ids=[])
        assert r.output_ids == ref
        assert r.num_tokens == max_new and sum(r.committed_per_step) == max_new
        assert r.verify_forwards == len(r.committed_per_step)
        # at most one draft forward per step (scope all: plus its own prefill)
        prefill = 1 if scope == "all" and len(prompt) > 1 else 0
        assert r.draft_forwards == sum(1 for k in r.proposed_per_step if k > 0) + prefill
        assert model.dflash_adapter.enabled is False  # the switch is restored

        # EOS: pick a token greedy actually produces (first occurrence late in the output) and stop there
        j = next(i for i in range(len(ref) - 1, 0, -1) if ref[i] not in ref[:i] and ref[i] != MASK)
        eos = ref[j]
        ref_eos = hf_greedy(model, prompt, max_new, eos=eos)
        assert ref_eos == ref[: j + 1]
        r = speculative_generate(model, prompt, LoRABlockDrafter(MASK, scope), block_size=block_size,
                                 max_new_tokens=max_new, eos_token_ids=[eos, 10_000])
        assert r.output_ids == ref_eos and r.hit_eos


def test_drafter_accepts_something(sdpa_model):
    """The random adapter is not a no-op drafter: some drafts are accepted, some rejected (both branches run)."""
    accepted = proposed = 0
    for prompt in prompts(4, seed=3):
        for scope in ("block", "all"):
            r = speculative_generate(sdpa_model, prompt, LoRABlockDrafter(MASK, scope), block_size=4,
                                     max_new_tokens=40, eos_token_ids=[])
            accepted += sum(r.accepted_per_step)
            proposed += sum(r.proposed_per_step)
    assert 0 < accepted < proposed


@pytest.mark.parametrize("block_size", [2, 4, 8])
@pytest.mark.parametrize("corrupt", [False, True])
def test_eos_and_max_tokens_mid_block(block_size, corrupt, sdpa_model):
    """With (noisy) oracle drafts the EOS lands inside an accepted block: output truncated right after it."""
    prompt = prompts()[0]
    ref = hf_greedy(sdpa_model, prompt, 40)
    full = prompt + ref + hf_greedy(sdpa_model, prompt + ref, block_size)  # drafts may look past the end
    # choose an EOS at a position that is not the last token of an oracle step (mid-block)
    js = [i for i in range(3, len(ref)) if ref[i] not in ref[:i] and (i + 1) % block_size != 0]
    j = js[0]
    eos = ref[j]
    r = speculative_generate(sdpa_model, prompt, OracleDrafter(full, corrupt=corrupt), block_size=block_size,
                             max_new_tokens=40, eos_token_ids=eos)
    assert r.output_ids == hf_greedy(sdpa_model, prompt, 40, eos=eos) == ref[: j + 1]
    if not corrupt:
        assert r.committed_per_step[-1] < r.accepted_per_step[-1] + 1  # truncated inside the block
    for max_new in (block_size + 1, 2 * block_size - 1, 5):
        r = speculative_generate(sdpa_model, prompt, OracleDrafter(full, corrupt=corrupt), block_size=block_size,
                                 max_new_tokens=max_new, eos_token_ids=[])
        assert r.output_ids == ref[:max_new]


# ------------------------------------------------------------------------------------------------------------------
# Accounting
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_accounting_oracle_and_wrong(block_size, sdpa_model):
    prompt = prompts()[1]
    ref = hf_greedy(sdpa_model, prompt, max(3 * block_size + 2, 12) + block_size)
    full = prompt + ref
    r = speculative_generate(sdpa_model, prompt, OracleDrafter(full), block_size=block_size,
                             max_new_tokens=3 * block_size, eos_token_ids=[])
    assert r.output_ids == ref[: 3 * block_size]
    assert r.committed_per_step == [block_size] * 3 and r.tau == block_size
    assert r.accepted_per_step == [block_size - 1] * 3
    # a final partial step is bounded by the end of generation
    r = speculative_generate(sdpa_model, prompt, OracleDrafter(full), block_size=block_size,
                             max_new_tokens=3 * block_size + 2, eos_token_ids=[])
    assert r.committed_per_step == [block_size] * 3 + [2]
    assert r.tau == pytest.approx((3 * block_size + 2) / 4)

    r = speculative_generate(sdpa_model, prompt, OracleDrafter(full, wrong=True), block_size=block_size,
                             max_new_tokens=12, eos_token_ids=[])
    assert r.output_ids == ref[:12]
    assert r.tau == 1.0 and set(r.committed_per_step) == {1} and set(r.accepted_per_step) == {0}
    assert r.verify_forwards == 12


@pytest.mark.parametrize("k", [0, 1, 2, 5, 7, 15])
@pytest.mark.parametrize("first", [1, 2, 3, 16])
def test_lazy_greedy_acceptance_equals_full(k, first):
    """accept_greedy_lazy = accept_greedy on the full logits, for every accepted prefix length, reading only the
    rows up to the first rejection (whole chunks: ``first``, then doubling; ``first`` >= k+1, a GPU session's
    setting: one call over every row)."""
    torch.manual_seed(k)
    hidden, head = torch.randn(k + 1, 16), torch.nn.Linear(16, 50, bias=False)
    target = head(hidden).argmax(-1).tolist()
    for n in range(k + 1):  # d_1 .. d_n agree with the target, d_{n+1} does not
        drafted = target[:n] + [(g + 1) % 50 for g in target[n:k]]
        read = []

        def counting_head(h):
            read.append(h.shape[0])
            return head(h)

        assert accept_greedy_lazy(drafted, hidden, counting_head, first=first) == accept_greedy(drafted, head(hidden))
        assert accept_greedy(drafted, head(hidden)) == (n, target[n])
        chunks, size = [], first
        while sum(chunks) < n + 1:
            chunks.append(min(size, k + 1 - sum(chunks)))
            size *= 2
        assert read == chunks, (n, read)


def test_autoregressive_baseline(sdpa_model, eager_model):
    for model in (sdpa_model, eager_model):
        for prompt in prompts():
            ref = hf_greedy(model, prompt, 15)
            r = autoregressive_generate(model, prompt, max_new_tokens=15, eos_token_ids=[])
            assert r.output_ids == ref and r.tau == 1.0 and r.draft_forwards == 0 and r.verify_forwards == 15


# ------------------------------------------------------------------------------------------------------------------
# KV cache: after every step it holds exactly the committed tokens
# ------------------------------------------------------------------------------------------------------------------


def _prefill_kv(model, ids: list[int], adapter: bool):
    from transformers import DynamicCache

    ctl = model.dflash_adapter
    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), ctl.preserved():
        ctl.set(adapter)
        model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    return cache


def _assert_same_cache(cache, fresh, length):
    assert cache.get_seq_length() == length == fresh.get_seq_length()
    for got, want in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scope", ["block", "all"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cache_holds_exactly_committed_tokens(scope, attn, sdpa_model, eager_model):
    model = sdpa_model if attn == "sdpa" else eager_model
    prompt = prompts()[0]
    steps = []

    def check(session, tokens, drafter):
        committed = tokens[:-1]  # the last committed token is not in the cache yet
        _assert_same_cache(session.cache, _prefill_kv(model, committed, adapter=False), len(committed))
        if getattr(drafter, "own_cache", False):  # scope all: adapter-on cache of the tokens committed up to its last draft
            n = drafter.own_cache_len
            assert 0 < n <= len(committed)
            _assert_same_cache(drafter.cache, _prefill_kv(model, committed[:n], adapter=True), n)
        steps.append(len(tokens))

    r = speculative_generate(model, prompt, LoRABlockDrafter(MASK, scope), block_size=4, max_new_tokens=20,
                             eos_token_ids=[], step_callback=check)
    assert len(steps) >= len(r.committed_per_step) - 1 >= 3

    # partial acceptance (noisy oracle) crops the rejected suffix every step
    ref = hf_greedy(model, prompt, 30)
    steps.clear()
    r = speculative_generate(model, prompt, OracleDrafter(prompt + ref, corrupt=True), block_size=6,
                             max_new_tokens=25, eos_token_ids=[], step_callback=check)
    assert r.output_ids == ref[:25] and len(steps) >= 3
    assert any(0 < n < k for n, k in zip(r.accepted_per_step, r.proposed_per_step))


def _training_style_block_logits(model, tokens: list[int], block: int, scope: str) -> torch.Tensor:
    """Logits of block positions 1..B-1 as the training forward computes them (dflash_ds.kinds.lora.lora_objective): clean
    tokens ``x[:a]`` then the block ``[x[a], MASK...]`` at positions ``a..a+B-1`` in one sequence, block queries
    seeing clean keys < a and their block; scope block gates the adapter to the block tokens."""
    from dflash_ds.blocks import additive_mask

    a = len(tokens) - 1
    S, T = a, a + block
    ids = torch.tensor([tokens[:a] + [tokens[a]] + [MASK] * (block - 1)])
    pos = torch.tensor([list(range(a)) + list(range(a, a + block))])
    visible = torch.zeros(T, T, dtype=torch.bool)
    visible[:S, :S] = torch.ones(S, S, dtype=torch.bool).tril()
    visible[S:, :] = True
    mask = additive_mask(visible[None], torch.float32)
    ctl = model.dflash_adapter
    with torch.no_grad(), ctl.preserved():
        ctl.set(True, rows_from=S if scope == "block" else 0)
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        logits = model.lm_head(hidden[0, S + 1 :])
    return logits


@pytest.mark.parametrize("scope", ["block", "all"])
@pytest.mark.parametrize("model_name", ["sdpa", "eager", "llama"])
def test_draft_logits_match_training_forward(scope, model_name, sdpa_model, eager_model, llama_model):
    """The decoder's draft (incremental, against a KV cache; scope all with committed tokens still pending) gives
    the same distribution as the training forward for the same context and anchor."""
    from dflash_ds.speculative import DecodeSession

    model = {"sdpa": sdpa_model, "eager": eager_model, "llama": llama_model}[model_name]
    tokens = prompts(1, length=14, seed=7)[0]
    B = 6
    session = DecodeSession(model, 64, B)
    drafter = LoRABlockDrafter(MASK, scope)
    with torch.no_grad():
        session.set_adapter(False)
        session.forward(session.ids(tokens[:5]), 0, session.cache, kind="prefill")
        drafter.start(session, tokens[:6])  # scope all: its own cache holds tokens[:5]
        drafter.propose(session, tokens[:6], B - 1, 0.0, None)
        session.set_adapter(False)
        session.forward(session.ids(tokens[5:13]), 5, session.cache, kind="verify")  # commit 8 more at once
        assert session.cache.get_seq_length() == 13
        # scope all: tokens[5:13] are pending and go through the same forward as the block
        got = drafter.propose(session, tokens, B - 1, 1.0, torch.Generator().manual_seed(0)).probs
    want = torch.softmax(_training_style_block_logits(model, tokens, B, scope), dim=-1)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-4)
    assert session.cache.get_seq_length() == 13
    if scope == "all":
        assert drafter.own_cache_len == 13 and drafter.cache.get_seq_length() == 13


def test_scope_all_differs_from_block(sdpa_model):
    """Scope all really drafts from an adapter-on context (different drafts), scope block from the verifier's."""
    prompt = prompts()[0]
    drafts = {}
    for scope in ("block", "all"):
        from dflash_ds.speculative import DecodeSession

        session = DecodeSession(sdpa_model, 64, 8)
        session.set_adapter(False)
        with torch.inference_mode():
            session.forward(session.ids(prompt[:-1]), 0, session.cache, kind="prefill")
            d = LoRABlockDrafter(MASK, scope)
            d.start(session, prompt)
            drafts[scope] = d.propose(session, prompt, 7, 0.0, None).tokens
            assert session.cache.get_seq_length() == len(prompt) - 1  # nothing drafted stays
    assert len(drafts["block"]) == 7 and drafts["block"] != drafts["all"]


# ------------------------------------------------------------------------------------------------------------------
# Baselines: n-gram lookup and the untrained floor are lossless; the floor equals a zero-B adapter
# ------------------------------------------------------------------------------------------------------------------


def test_ngram_proposals():
    d = NgramDrafter(max_ngram=3)
    d.start(None, [])
    # latest earlier occurrence of the longest suffix n-gram wins
    toks = [1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3]
    assert d.propose(None, toks, 3).tokens == [8, 5, 1]
    d.start(None, [])
    assert d.propose(None, [4, 5, 6, 7], 3).tokens == []  # nothing repeats
    d.start(None, [])
    assert d.propose(None, [4, 5, 4, 6, 5], 2).tokens == [4, 6]  # falls back to a 1-gram
    assert d.propose(None, [4, 5, 4, 6, 5, 4], 5).tokens == [6, 5, 4]  # incremental index, 2-gram [5, 4]


def test_ngram_and_floor_are_lossless(sdpa_model):
    looping = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    for prompt in prompts() + [looping]:
        ref = hf_greedy(sdpa_model, prompt, 30)
        for drafter in (NgramDrafter(), untrained_floor_drafter(MASK)):
            r = speculative_generate(sdpa_model, prompt, drafter, block_size=5, max_new_tokens=30, eos_token_ids=[])
            assert r.output_ids == ref


def test_floor_equals_zero_b_adapter(sdpa_model):
    zero = copy.deepcopy(sdpa_model)
    with torch.no_grad():
        for _, module in lora_modules(zero):
            module.lora_B.weight.zero_()
    for prompt in prompts():
        a = speculative_generate(sdpa_model, prompt, untrained_floor_drafter(MASK), block_size=4, max_new_tokens=20,
                                 eos_token_ids=[])
        b = speculative_generate(zero, prompt, LoRABlockDrafter(MASK, "block"), block_size=4, max_new_tokens=20,
                                 eos_token_ids=[])
        c = speculative_generate(sdpa_model, prompt, LoRABlockDrafter(MASK, "block"), block_size=4,
                                 max_new_tokens=20, eos_token_ids=[])
        assert a.output_ids == b.output_ids == c.output_ids
        assert a.accepted_per_step == b.accepted_per_step
    # and the trained (here: random) adapter drafts differently from the floor somewhere
    from dflash_ds.speculative import DecodeSession

    prompt = prompts()[0]
    out = []
    for drafter in (untrained_floor_drafter(MASK), LoRABlockDrafter(MASK, "block")):
        session = DecodeSession(sdpa_model, 64, 8)
        session.set_adapter(False)
        with torch.inference_mode():
            session.forward(session.ids(prompt[:-1]), 0, session.cache, kind="prefill")
            drafter.start(session, prompt)
            out.append(drafter.propose(session, prompt, 7, 0.0, None).tokens)
    assert out[0] != out[1]


# ------------------------------------------------------------------------------------------------------------------
# Sampling is lossless
# ------------------------------------------------------------------------------------------------------------------


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, float]:
    """Pearson chi-square of ``counts`` against ``probs`` (cells with expected count < 5 pooled into one)."""
    n = counts.sum()
    expected = probs * n
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(stat), float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2.0))


def _exact_two_token_distribution(model, prompt, temperature):
    """p(x1, x2) of the target (adapter off) at ``temperature``, computed from its logits."""
    ctl = model.dflash_adapter
    ctl.set(False)
    V = model.config.vocab_size
    with torch.inference_mode():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
        batch = torch.tensor([prompt + [x] for x in range(V)])
        p2 = torch.softmax(model(batch).logits[:, -1].double() / temperature, -1)  # [V(x1), V(x2)]
    return (p1[:, None] * p2).reshape(-1)


@pytest.mark.slow
def test_sampling_is_lossless():
    """1000 (600) seeded speculative runs per drafter: the joint of the first 2 tokens matches the target's exactly
    computed distribution (chi-square, p > 1e-3), both for the adapter's sampled drafts (q = drafter softmax)
    and for deterministic proposals (q one-hot)."""
    V, T = 8, 1.0
    model = tiny_model("sdpa", vocab=V, hidden=32, layers=1, seed=5, b_std=0.5, logit_scale=8.0)
    prompt = [1, 4, 6]
    exact = _exact_two_token_distribution(model, prompt, T)
    assert exact.max() < 0.5 and (exact > 0.01).sum() >= 8  # a distribution worth testing

    class Fixed:
        name = "fixed"

        def start(self, session, tokens):
            pass

        def propose(self, session, tokens, num, temperature, generator):
            return Draft([int(exact.argmax()) // V, 2][:num])

    for drafter_factory, N in ((lambda: LoRABlockDrafter(MASK, "block"), 1000), (Fixed, 600)):
        counts = torch.zeros(V * V, dtype=torch.float64)
        stats = {"accepted": 0, "rejected": 0}
        for s in range(N):
            gen = torch.Generator().manual_seed(s)
            r = speculative_generate(model, prompt, drafter_factory(), block_size=3, max_new_tokens=3,
                                     eos_token_ids=[], temperature=T, generator=gen)
            x1, x2 = r.output_ids[:2]
            counts[x1 * V + x2] += 1
            stats["accepted"] += sum(r.accepted_per_step)
            stats["rejected"] += sum(1 for n, k in zip(r.accepted_per_step, r.proposed_per_step) if n < k)
        assert stats["accepted"] > 100 and stats["rejected"] > 100  # both branches are exercised
        stat, p = _chi_square_pvalue(counts, exact)
        assert p > 1e-3, f"speculative sampling is not lossless: chi2={stat:.1f}, p={p:.2e}"

    # power: the drafter's own first-token distribution q is far from the target's, so a sampler that leaked q
    # (e.g. always accepting) would fail the test above by a wide margin
    from dflash_ds.speculative import DecodeSession

    session = DecodeSession(model, 16, 3)
    session.set_adapter(False)
    with torch.inference_mode():
        session.forward(session.ids(prompt[:-1]), 0, session.cache, kind="prefill")
        d = LoRABlockDrafter(MASK, "block")
        d.start(session, prompt)
        q1 = d.propose(session, prompt, 2, T, torch.Generator().manual_seed(0)).probs[0].double()
    p1 = exact.reshape(V, V).sum(1)
    assert 1000 * float(((q1 - p1) ** 2 / p1).sum()) > 200
