"""The fused loop (one forward verifies the last draft and drafts the next): its step layout is the training layout,
its output is the target's (greedy and sampled), its KV cache holds exactly the committed tokens, and its accounting
(acceptance, fallbacks, group choice) follows the drafts it was given."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from dflash_ds.lora import AdapterControl
from dflash_ds.speculative import DecodeSession, autoregressive_generate
from dflash_ds.kinds import FusedConfig
from dflash_ds.kinds.lora import fused_generate, fused_step_layout

from test_speculative import (  # noqa: E402  (the shared tiny models and references of the two-forward loop's tests)
    MASK,
    _assert_same_cache,
    _chi_square_pvalue,
    _exact_two_token_distribution,
    _prefill_kv,
    _training_style_block_logits,
    eager_model,
    hf_greedy,
    llama_model,  # noqa: F401  (a fixture: SmolLM2-shaped, so the fused loop is checked on a second family)
    prompts,
    sdpa_model,
    tiny_model,
)

CONFIGS = [
    FusedConfig(),
    FusedConfig(groups=2),
    FusedConfig(groups=1, fallback="draft"),
    FusedConfig(reject_mismatch=True),
]


# ------------------------------------------------------------------------------------------------------------------
# The step layout is the training layout
# ------------------------------------------------------------------------------------------------------------------


def _reference_layout(k: int, anchors, B: int):
    """Written out row by row: verify rows causal; group i sees verify rows 0 .. i-1 and its own block."""
    V = k + 1
    R = V + len(anchors) * B
    visible = torch.zeros(R, R, dtype=torch.bool)
    offsets = []
    for r in range(V):
        for c in range(r + 1):
            visible[r, c] = True
        offsets.append(r)
    for j, i in enumerate(anchors):
        first = V + j * B
        for r in range(first, first + B):
            for c in range(i):
                visible[r, c] = True
            for c in range(first, first + B):
                visible[r, c] = True
            offsets.append(i + r - first)
    return visible, torch.tensor(offsets)


@pytest.mark.parametrize("k,anchors,B", [(0, (0,), 4), (3, (0, 1, 2, 3), 4), (6, (0, 2, 5), 8), (2, (), 3), (5, (5,), 6)])
def test_step_layout_matches_a_plain_reference(k, anchors, B):
    visible, offsets = fused_step_layout(k, anchors, B)
    want_visible, want_offsets = _reference_layout(k, anchors, B)
    assert torch.equal(visible, want_visible)
    assert torch.equal(offsets, want_offsets)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_group_logits_equal_the_training_forward(attn, sdpa_model, eager_model):
    """Each group of one fused forward (against a KV cache, beside the verify rows and the other groups) gives the
    logits the training forward gives a block anchored at the same token: an adapter trained today drafts here."""
    model = sdpa_model if attn == "sdpa" else eager_model
    tokens = prompts(1, length=12, seed=4)[0]
    L, k, B = 7, 4, 5
    anchors = (0, 2, 4)
    t, drafts = tokens[L], tokens[L + 1 : L + 1 + k]
    session = DecodeSession(model, 64, B)
    visible, offsets = fused_step_layout(k, anchors, B)
    ids = [t, *drafts]
    for i in anchors:
        ids += [([t, *drafts])[i]] + [MASK] * (B - 1)
    mask = torch.zeros(1, 1, len(ids), L + len(ids))
    mask[0, 0, :, L:].masked_fill_(~visible, torch.finfo(torch.float32).min)
    with torch.no_grad(), model.dflash_adapter.preserved():
        session.set_adapter(False)
        session.forward(session.ids(tokens[:L]), 0, session.cache, kind="prefill")
        hidden = session.forward_hidden(session.ids(ids), (offsets + L)[None], mask, rows_from=k + 1, kind="verify")
        verify = model.lm_head(hidden[: k + 1])
        for j, i in enumerate(anchors):
            first = k + 1 + j * B
            got = model.lm_head(hidden[first + 1 : first + B])
            want = _training_style_block_logits(model, tokens[: L + i + 1], B, "block")
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # the verify rows are the target itself
    full = model(input_ids=torch.tensor([tokens[: L + k + 1]])).logits[0, L:]
    torch.testing.assert_close(verify, full, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# Greedy output is the target's, token for token
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=["all", "groups2", "groups1-draft", "reject-mismatch"])
@pytest.mark.parametrize("block_size", [3, 4, 8])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "llama"])
def test_greedy_equals_generate(config, block_size, attn, sdpa_model, eager_model, llama_model):
    model = {"sdpa": sdpa_model, "eager": eager_model, "llama": llama_model}[attn]
    for prompt in prompts():
        max_new = 3 * block_size + 1
        ref = hf_greedy(model, prompt, max_new)
        r = fused_generate(model, prompt, MASK, block_size=block_size, max_new_tokens=max_new, config=config)
        assert r.output_ids == ref
        assert r.num_tokens == max_new and r.verify_forwards == len(r.committed_per_step)
        assert r.draft_forwards == (r.fallbacks if config.fallback == "draft" else 0)
        assert model.dflash_adapter.enabled is False  # the switch is restored
        j = next(i for i in range(len(ref) - 1, 0, -1) if ref[i] not in ref[:i] and ref[i] != MASK)
        r = fused_generate(model, prompt, MASK, block_size=block_size, max_new_tokens=max_new,
                           eos_token_ids=[ref[j], 10_000], config=config)
        assert r.output_ids == ref[: j + 1] and r.hit_eos


def test_cache_holds_exactly_committed_tokens(sdpa_model):
    prompt = prompts()[0]
    seen = []

    def check(session, tokens, drafts):
        committed = tokens[:-1]
        _assert_same_cache(session.cache, _prefill_kv(sdpa_model, committed, adapter=False), len(committed))
        seen.append(len(tokens))

    for config in CONFIGS:
        r = fused_generate(sdpa_model, prompt, MASK, block_size=4, max_new_tokens=16, config=config,
                           step_callback=check)
        assert r.output_ids == hf_greedy(sdpa_model, prompt, 16)
    assert len(seen) >= 4 * 5


# ------------------------------------------------------------------------------------------------------------------
# Accounting with drafts of known quality: a stand-in model whose drafter is right except where told
# ------------------------------------------------------------------------------------------------------------------


class SequenceLM(nn.Module):
    """A causal LM stand-in for the loop logic: the target's next token after position ``p`` is ``seq[p + 1]``
    whatever the input; a row with the adapter on (a drafter row, labelled by its own position as in training)
    predicts ``seq[p]``, except at the positions in ``wrong`` (there: ``seq[p] + 1``). Its KV cache stores each row's input token, so a test reads
    back exactly what stayed cached. It also records every forward's row count."""

    def __init__(self, seq: list[int], vocab: int, wrong=()):
        super().__init__()
        self.seq, self.vocab, self.wrong = seq, vocab, set(wrong)
        self.config = PretrainedConfig()
        self.config.num_hidden_layers = 1
        self.lm_head = nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(vocab))
        self.dflash_adapter = AdapterControl()
        self.rows_per_forward: list[int] = []

    def get_decoder(self):
        lm = self

        class Decoder(nn.Module):
            def forward(self, input_ids, position_ids, attention_mask=None, use_cache=True, cache=None, **_):
                return lm._decode(input_ids, position_ids, attention_mask, use_cache, cache)

        return Decoder()

    def get_output_embeddings(self):
        return self.lm_head

    def _decode(self, input_ids, position_ids, attention_mask=None, use_cache=True, cache=None, **_):
        q = input_ids.shape[1]
        ctl = self.dflash_adapter
        hidden = torch.zeros(1, q, self.vocab)
        for r in range(q):
            p = int(position_ids[0, r])
            if ctl.enabled and r >= ctl.rows_from:  # a drafter row predicts the token at its own position
                tok = (self.seq[p] + (p in self.wrong)) % self.vocab
            else:  # a target row predicts the next token
                tok = self.seq[p + 1]
            hidden[0, r, tok] = 1.0
        kv = input_ids.float()[:, None, :, None]  # [1, heads 1, q, 1]
        cache.update(kv, kv, 0)
        self.rows_per_forward.append(q)
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=True, cache=None,
                logits_to_keep=0, **_):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1])[None]
        hidden = self._decode(input_ids, position_ids, attention_mask, use_cache, cache).last_hidden_state
        return CausalLMOutputWithPast(logits=self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden))


def _seq(n: int = 200, vocab: int = 50, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n,), generator=g).tolist()


def test_perfect_drafter_commits_a_block_per_forward():
    seq, B = _seq(), 6
    model = SequenceLM(seq, 50)
    prompt = seq[:10]

    def check(session, tokens, drafts):
        assert session.cache.layers[0].keys.flatten().long().tolist() == tokens[:-1]  # exactly the committed tokens
        assert tokens == seq[: len(tokens)]

    r = fused_generate(model, prompt, MASK, block_size=B, max_new_tokens=41, step_callback=check)
    assert r.output_ids == seq[10:51]
    # first forward: no drafts, 1 token + B-2 drafts; then every forward accepts all B-2 drafts + the bonus
    assert r.committed_per_step == [1] + [B - 1] * 8
    assert r.accepted_per_step == [0] + [B - 2] * 8
    assert r.fallbacks == 0 and r.draft_forwards == 0 and r.verify_forwards == 9
    # rows: prefill, then [t | group 0], then [t, 4 drafts | 5 groups of 6]
    assert model.rows_per_forward[:3] == [9, 1 + B, (B - 1) + (B - 1) * B]


def test_rejection_picks_the_group_anchored_at_the_outcome():
    """With the drafter wrong at one position per block, the accepted prefix stops there, and the next drafts come
    from the group anchored at the last accepted token (they are right again after the bonus)."""
    seq, B = _seq(seed=1), 6
    wrong = {p for p in range(12, 200) if p % 7 == 0}
    model = SequenceLM(seq, 50, wrong=wrong)
    r = fused_generate(model, seq[:10], MASK, block_size=B, max_new_tokens=60)
    assert r.output_ids == seq[10:70]
    assert any(0 < n < k for n, k in zip(r.accepted_per_step, r.proposed_per_step))  # partial acceptance
    assert r.fallbacks == 0  # every outcome had a group
    # reference: the same loop simulated with position arithmetic alone
    pos, drafts, want = 9, [], []  # pos: position of t, the last committed token
    while pos - 9 < 60:
        drafts = drafts[: 60 - (pos - 9) - 1]
        n = 0
        while n < len(drafts) and drafts[n] == seq[pos + 1 + n]:
            n += 1
        want.append(n)
        pos += n + 1
        # the group anchored at d_n (now at pos - 1) guessed the bonus slot pos, then drafts pos+1 .. pos+B-2
        drafts = [(seq[p] + (p in wrong)) % 50 for p in range(pos + 1, pos + B - 1)]
    assert r.accepted_per_step == want


@pytest.mark.parametrize("fallback", ["refill", "draft"])
def test_fewer_groups_fall_back(fallback):
    seq, B = _seq(seed=2), 6
    wrong = {p for p in range(12, 200) if p % 5 == 0}
    model = SequenceLM(seq, 50, wrong=wrong)
    r = fused_generate(model, seq[:10], MASK, block_size=B, max_new_tokens=60,
                       config=FusedConfig(groups=1, fallback=fallback))
    assert r.output_ids == seq[10:70]
    assert r.fallbacks > 0
    assert r.draft_forwards == (r.fallbacks if fallback == "draft" else 0)
    # one group per forward: at most the verify rows (t + B-1 drafts after a draft-only forward) and one block
    assert max(model.rows_per_forward[1:]) <= B + B


def test_reject_mismatch_drops_a_group_that_guessed_the_bonus_wrong():
    seq, B = _seq(seed=3), 5
    wrong = {p for p in range(12, 200) if p % 6 == 0}
    keep = fused_generate(SequenceLM(seq, 50, wrong=wrong), seq[:10], MASK, block_size=B, max_new_tokens=50)
    drop = fused_generate(SequenceLM(seq, 50, wrong=wrong), seq[:10], MASK, block_size=B, max_new_tokens=50,
                          config=FusedConfig(reject_mismatch=True))
    assert keep.output_ids == drop.output_ids == seq[10:60]
    assert keep.fallbacks == 0 < drop.fallbacks


# ------------------------------------------------------------------------------------------------------------------
# Sampling is lossless
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sampling_is_lossless():
    """1000 seeded fused runs: the joint of the first 2 tokens (the second verified against the group's sampled
    draft, q = the group's softmax) matches the target's exactly computed distribution (chi-square, p > 1e-3)."""
    V, T = 8, 1.0
    model = tiny_model("sdpa", vocab=V, hidden=32, layers=1, seed=5, b_std=0.5, logit_scale=8.0)
    prompt = [1, 4, 6]
    exact = _exact_two_token_distribution(model, prompt, T)
    counts = torch.zeros(V * V, dtype=torch.float64)
    accepted = rejected = 0
    for s in range(1000):
        r = fused_generate(model, prompt, MASK, block_size=3, max_new_tokens=3, temperature=T,
                           generator=torch.Generator().manual_seed(s))
        x1, x2 = r.output_ids[:2]
        counts[x1 * V + x2] += 1
        accepted += r.accepted_per_step[1]
        rejected += r.proposed_per_step[1] - r.accepted_per_step[1]
    assert accepted > 100 and rejected > 100  # both branches of the rejection sampler ran
    stat, p = _chi_square_pvalue(counts, exact)
    assert p > 1e-3, f"fused sampling is not lossless: chi2={stat:.1f}, p={p:.2e}"


def test_needs_an_adapter_and_a_block_of_three(sdpa_model):
    with pytest.raises(ValueError, match="block_size >= 3"):
        fused_generate(sdpa_model, [5, 6], MASK, block_size=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="--fused-groups"):
        FusedConfig(groups=0)
    with pytest.raises(ValueError, match="--fused-fallback"):
        FusedConfig(fallback="nope")
    assert autoregressive_generate(sdpa_model, [5, 6], max_new_tokens=3).num_tokens == 3


# ------------------------------------------------------------------------------------------------------------------
# Static cache and compiled decoder: the same tokens and the same acceptance as the dynamic, eager path (fp32)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True], ids=["static", "compiled"])
def test_static_and_compiled_paths_are_exact(compile):
    from dflash_ds.kinds.lora import LoRABlockDrafter
    from dflash_ds.speculative import StaticDecoding, speculative_generate

    import torch._dynamo

    # dynamo's graph counter is process-global: start from zero so the count below is this test's alone, whatever
    # compiled before it in the same session
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model("sdpa", layers=1, seed=2)
    static = StaticDecoding(model, 160, compile=compile)
    for prompt in prompts():
        for config in (FusedConfig(), FusedConfig(groups=1, fallback="draft")):
            want = fused_generate(model, prompt, MASK, block_size=4, max_new_tokens=20, config=config)
            got = fused_generate(model, prompt, MASK, block_size=4, max_new_tokens=20, config=config, static=static)
            assert got.output_ids == want.output_ids == hf_greedy(model, prompt, 20)
            assert got.accepted_per_step == want.accepted_per_step and got.fallbacks == want.fallbacks
        two = speculative_generate(model, prompt, LoRABlockDrafter(MASK), block_size=4, max_new_tokens=20,
                                   static=static)
        ar = autoregressive_generate(model, prompt, max_new_tokens=20, static=static)
        assert two.output_ids == ar.output_ids == want.output_ids
    # the static cache is one allocation shared by every generation; a generation that cannot fit fails up front
    with pytest.raises(ValueError, match="static cache holds 160 tokens"):
        fused_generate(model, list(range(4, 90)), MASK, block_size=4, max_new_tokens=60, static=static)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if not compile:
        assert frames == 0, frames  # the static path alone compiles nothing
    else:  # one graph per kind of forward (fused, AR, verify, draft): padding keeps the shapes fixed
        # measured 5 with torch 2.13; a shape or stride that varies per session compiled a new graph each time and
        # ran into dynamo's limit of 8 (then silently ran eager)
        assert 1 <= frames <= 6, frames
