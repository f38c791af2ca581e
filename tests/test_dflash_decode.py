"""Decoding with the standalone DFlash drafter (dflash_ds/speculative/dflash_loop.py): lossless greedy and sampling,
the drafter's context cache, and a drafter trained by DFlashDraftObjective drafting in the loop."""

import copy

import pytest
import torch

from conftest import tiny_model
from test_speculative import _chi_square_pvalue
from dflash_ds.blocks import BlockConfig, build_block_layout
from dflash_ds.kinds.dflash import (
    dflash_autoregressive_generate,
    dflash_generate,
    DFlashDecodeState,
    DFlashDraftModel,
    DFlashDraftObjective,
    init_from_target,
    make_draft_config,
    resolve_block,
)
from dflash_ds.loss import LossConfig
from dflash_ds.speculative import SpecResult

MASK = 95
VOCAB = 96


def _target(family, seed=0, **overrides):
    # llama: a larger init, else a random tied-embedding model's greedy output repeats its last token
    extra = dict(initializer_range=0.2) if family == "llama" else {}
    target = tiny_model(family, seed=seed, num_hidden_layers=6, **{**extra, **overrides})
    target.generation_config.eos_token_id = None  # LlamaConfig's default EOS (2) would stop generate early
    return target


def _drafter(target, block_size=8, layers=2, seed=1, init=False, **kw):
    torch.manual_seed(seed)
    cfg = make_draft_config(target.config, layers, block_size=block_size, mask_token_id=MASK, **kw)
    drafter = DFlashDraftModel(cfg).eval()
    if init:
        init_from_target(drafter, target)
    return drafter


@pytest.fixture(scope="module")
def models():
    out = {}
    for family in ("qwen3", "llama"):
        target = _target(family)
        out[family] = (target, _drafter(target), _drafter(target, init=True))
    return out


def hf_greedy(target, prompt, max_new_tokens, eos=None):
    ids = torch.tensor([prompt])
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(n=2, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randint(4, 90, (length,), generator=gen).tolist() for _ in range(n)]
    out.append([7])  # a one-token prompt: nothing to prefill, the first draft has no context
    return out


# ---------------------------------------------------------------------------------------------------------------
# greedy: token for token transformers' generate


@pytest.mark.parametrize("init", [False, True], ids=["random", "init_from_target"])
@pytest.mark.parametrize("block_size", [2, 4, 8])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_greedy_equals_generate(family, block_size, init, models):
    target, random_drafter, init_drafter = models[family]
    drafter = init_drafter if init else random_drafter
    for prompt in prompts():
        max_new = 3 * block_size + 1  # ends mid-block
        ref = hf_greedy(target, prompt, max_new)
        r = dflash_generate(target, drafter, prompt, max_new, eos_token_ids=[], block_size=block_size)
        assert isinstance(r, SpecResult) and r.loop == "dflash"
        assert r.output_ids == ref
        assert r.num_tokens == max_new == sum(r.committed_per_step)
        assert r.verify_forwards == len(r.committed_per_step)
        assert r.draft_forwards == sum(1 for k in r.proposed_per_step if k > 0)
        assert r.prefill_forwards == (1 if len(prompt) > 1 else 0)
        assert max(r.proposed_per_step) == block_size - 1
        assert r.target_rows == sum(k + 1 for k in r.proposed_per_step)
        assert r.rows == r.target_rows + r.draft_rows == r.target_rows + block_size * r.draft_forwards


def test_default_block_size_and_mask_come_from_the_drafter(models):
    target, drafter, _ = models["qwen3"]
    prompt = prompts()[0]
    r = dflash_generate(target, drafter, prompt, 12)
    assert max(r.proposed_per_step) == drafter.block_size - 1 == 7
    assert r.output_ids == hf_greedy(target, prompt, 12)
    assert resolve_block(drafter, None, None) == (8, MASK)
    assert resolve_block(None, None, None) == (1, None)
    with pytest.raises(ValueError, match="block_size"):
        resolve_block(drafter, 1, None)
    nameless = copy.deepcopy(drafter)
    nameless.mask_token_id = None
    with pytest.raises(ValueError, match="mask_token_id"):
        resolve_block(nameless, None, None)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_eos_stops_generation(family, models):
    target, _, drafter = models[family]
    for prompt in prompts():
        ref = hf_greedy(target, prompt, 25)
        # a token greedy produces (its first occurrence, late in the output): the output ends right after it
        j = next(i for i in range(len(ref) - 1, 0, -1) if ref[i] not in ref[:i])
        eos = ref[j]
        r = dflash_generate(target, drafter, prompt, 25, eos_token_ids=[eos, 10_000], block_size=4)
        assert r.output_ids == hf_greedy(target, prompt, 25, eos=eos) == ref[: j + 1] and r.hit_eos
        r = dflash_generate(target, drafter, prompt, 25, eos_token_ids=eos, block_size=4)
        assert r.output_ids == ref[: j + 1]
    # max_new_tokens 1: one verify forward, nothing drafted
    r = dflash_generate(target, drafter, prompts()[0], 1, block_size=4)
    assert r.output_ids == hf_greedy(target, prompts()[0], 1) and r.draft_forwards == 0 and r.verify_forwards == 1


def test_autoregressive_baseline_on_the_same_engine(models):
    target, _, _ = models["qwen3"]
    for prompt in prompts():
        r = dflash_autoregressive_generate(target, prompt, 15)
        assert r.output_ids == hf_greedy(target, prompt, 15)
        assert r.tau == 1.0 and r.draft_forwards == 0 and r.verify_forwards == 15
        assert r.loop == "dflash_autoregressive"


def test_drafter_initialised_from_the_target_accepts_more(models):
    """On the tiny random target the effect is small but there: the copied layers draft some of its tokens, the
    random drafter (almost) none."""
    target, random_drafter, init_drafter = models["qwen3"]
    accepted = {}
    for name, drafter in (("random", random_drafter), ("init", init_drafter)):
        rs = [dflash_generate(target, drafter, p, 30, block_size=4) for p in prompts(4, seed=1)]
        accepted[name] = sum(sum(r.accepted_per_step) for r in rs)
    assert accepted["init"] > accepted["random"], accepted


# ---------------------------------------------------------------------------------------------------------------
# the drafter's context cache: exactly the committed rows, the same drafts as a from-scratch forward


def _uncached_draft_logits(target, drafter, committed, anchor, num):
    """The drafter's logits for a block anchored after ``committed`` tokens, from the target's features of all of
    them (a fresh full forward, no cache)."""
    with torch.no_grad():
        hs = target(torch.tensor([committed]), output_hidden_states=True).hidden_states
        B = drafter.block_size if num < drafter.block_size else num + 1
        block = torch.full((1, B), MASK)
        block[0, 0] = anchor
        L = len(committed)
        h = drafter(target.get_input_embeddings()(block), torch.arange(L, L + B)[None],
                    drafter.project_context(hs))
        return target.lm_head(h[0, 1:1 + num])


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_context_cache_holds_exactly_the_committed_rows(family, models):
    target, _, drafter = models[family]
    drafter = copy.deepcopy(drafter)
    drafter.block_size = 4
    seen = {"steps": 0, "partial": 0}

    def check(state: DFlashDecodeState):
        L0 = state.draft_start
        assert state.context_rows == state.committed_rows == target_cache_len(state)
        if not state.drafted:  # the last token of max_new_tokens: verified alone, no draft forward
            return
        # after the draft forward the context cache held the L0 committed rows; now cache + pending == committed
        assert state.context.length == L0
        assert state.pending.shape[1] == state.committed_rows - L0
        committed = state.tokens[:L0]
        want = _uncached_draft_logits(target, drafter, committed, state.tokens[L0], len(state.drafted))
        torch.testing.assert_close(state.draft_logits, want, rtol=1e-5, atol=1e-5)
        n = state.committed_rows - L0 - 1
        seen["steps"] += 1
        seen["partial"] += 0 < n < len(state.drafted)

    def target_cache_len(state):
        return int(state.target_cache.get_seq_length())

    for prompt in prompts(3, seed=2)[:3]:
        r = dflash_generate(target, drafter, prompt, 30, block_size=4, step_callback=check)
        assert r.output_ids == hf_greedy(target, prompt, 30)
    assert seen["steps"] >= 20 and seen["partial"] >= 1, seen  # rejected rows' features were dropped


# ---------------------------------------------------------------------------------------------------------------
# training and decoding agree: a drafter trained by DFlashDraftObjective drafts the target's tokens


def test_trained_drafter_reaches_a_higher_tau():
    """A few hundred steps on the target's own greedy continuations (fitting them: the tiny random target's text is
    noise) take τ on those prompts from ~1 to ~2: the objective's anchors, positions and context visibility are the
    loop's. Output stays equal to generate."""
    B, P, new = 4, 6, 26
    target = _target("qwen3")
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(4, 90, (24, P), generator=gen)
    seqs = target.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=new,
                           do_sample=False, pad_token_id=0)
    loss_mask = torch.ones_like(seqs)
    loss_mask[:, :P] = 0
    drafter = _drafter(target, block_size=B, init=True).train()
    before = [dflash_generate(target, drafter, s[:P].tolist(), new).tau for s in seqs[:6]]
    objective = DFlashDraftObjective(target, drafter, LossConfig(kl_weight=1.0)).train()
    opt = torch.optim.AdamW(objective.trainable_parameters(), lr=3e-3)
    cfg = BlockConfig(block_size=B, num_anchors=6, mask_token_id=MASK)
    for step in range(120):
        idx = torch.randint(0, len(seqs), (8,), generator=gen)
        ids, attn = seqs[idx], torch.ones_like(seqs[idx])
        layout = build_block_layout(ids, loss_mask[idx], attn, cfg, [step * 8 + i for i in range(8)])
        opt.zero_grad()
        objective(ids, attn, layout).loss.backward()
        opt.step()
    drafter.eval()
    after = []
    for s in seqs[:6]:
        r = dflash_generate(target, drafter, s[:P].tolist(), new)
        assert r.output_ids == s[P:].tolist()
        after.append(r.tau)
    assert sum(before) / 6 < 1.3 and sum(after) / 6 > 1.6, (before, after)


# ---------------------------------------------------------------------------------------------------------------
# sampling is lossless


def _exact_two_token_distribution(target, prompt, temperature):
    V = target.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
        batch = torch.tensor([prompt + [x] for x in range(V)])
        p2 = torch.softmax(target(batch).logits[:, -1].double() / temperature, -1)
    return (p1[:, None] * p2).reshape(-1)


def sampled_first_two(target, drafter, prompt, temperature, runs=1000):
    """``(counts [V*V], accepted, rejected)``: the first two generated tokens' joint over ``runs`` seeded
    generations, and how many drafts were accepted and how many steps rejected one."""
    V = target.config.vocab_size
    counts = torch.zeros(V * V, dtype=torch.float64)
    accepted = rejected = 0
    for s in range(runs):
        r = dflash_generate(target, drafter, prompt, 3, temperature=temperature,
                            generator=torch.Generator().manual_seed(s))
        x1, x2 = r.output_ids[:2]
        counts[x1 * V + x2] += 1
        accepted += sum(r.accepted_per_step)
        rejected += sum(1 for n, k in zip(r.accepted_per_step, r.proposed_per_step) if n < k)
    return counts, accepted, rejected


@pytest.mark.slow
def test_sampling_is_lossless():
    """1000 seeded runs: the joint of the first two generated tokens matches the target's exactly computed
    distribution (chi-square, p > 1e-3), with the drafter's sampled drafts (q = its softmax) accepted and rejected
    often; the drafter's q is far from p, so a sampler that leaked q would fail."""
    V, T, mask = 8, 1.0, 7
    target = tiny_model("qwen3", seed=5, vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)
    torch.manual_seed(6)
    drafter = DFlashDraftModel(make_draft_config(target.config, 1, target_layer_ids=[0], block_size=3,
                                                 mask_token_id=mask)).eval()
    prompt = [1, 4, 6]
    exact = _exact_two_token_distribution(target, prompt, T)
    assert exact.max() < 0.5 and (exact > 0.01).sum() >= 8  # a distribution worth testing
    counts, accepted, rejected = sampled_first_two(target, drafter, prompt, T)
    assert accepted > 100 and rejected > 100, (accepted, rejected)  # both branches are exercised
    stat, p = _chi_square_pvalue(counts, exact)
    assert p > 1e-3, f"DFlash speculative sampling is not lossless: chi2={stat:.1f}, p={p:.2e}"

    # power: the drafter's first-token distribution q is far from the target's p
    first = {}
    dflash_generate(target, drafter, prompt, 3, temperature=T, generator=torch.Generator().manual_seed(0),
                    step_callback=lambda st: first.setdefault("q", torch.softmax(st.draft_logits[0].double() / T, -1)))
    p1 = exact.reshape(V, V).sum(1)
    assert 1000 * float(((first["q"] - p1) ** 2 / p1).sum()) > 200


# ---------------------------------------------------------------------------------------------------------------
# the engine the LoRA loops use: a static KV cache and compiled verify forwards give the same tokens and drafts


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True], ids=["static", "compiled"])
def test_static_and_compiled_target_forwards_are_exact(compile, models):
    """dflash_generate on a StaticDecoding (padded verify forwards, the feature tap traced into the compiled
    decoder): the same output and acceptance as the dynamic cache, the AR baseline on the same static cache too."""
    import torch._dynamo

    from dflash_ds.kinds.dflash import FeatureTap
    from dflash_ds.speculative import StaticDecoding, autoregressive_generate

    target, _, drafter = copy.deepcopy(models["qwen3"])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    static = StaticDecoding(target, 160, compile=compile)
    tap = FeatureTap.of(target, drafter.target_layer_ids)  # before the first compiled forward
    # the copy has a tap of its own (the module's earlier tests tapped the original's layers)
    assert tap is not FeatureTap.of(models["qwen3"][0]) and tap.layers is target.model.layers
    for prompt in prompts():
        for B in (4, 8):
            want = dflash_generate(target, drafter, prompt, 20, block_size=B)
            got = dflash_generate(target, drafter, prompt, 20, block_size=B, static=static)
            assert got.output_ids == want.output_ids == hf_greedy(target, prompt, 20)
            assert got.accepted_per_step == want.accepted_per_step and got.rows == want.rows
        ar = autoregressive_generate(target, prompt, max_new_tokens=20, static=static)
        assert ar.output_ids == want.output_ids
    assert not tap.active and not tap.out  # off between generations, nothing held
    if compile:  # one graph per kind of forward: AR (tap off), verify B=4 and B=8 (tap on)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert frames <= 5, frames
