"""The standalone drafter's draft vocabulary (dflash_ds/kinds/dflash/draft_vocab.py): choosing it, the d2t table
vLLM reads, the objective through the drafter's own head against a plain reference, lossless decoding (greedy and
sampled) over it, and the export read back."""

import json

import pytest
import torch

from conftest import tiny_model
from test_dflash_decode import _exact_two_token_distribution, hf_greedy, prompts, sampled_first_two
from test_speculative import _chi_square_pvalue
from dflash_ds.blocks import BlockConfig, build_block_layout
from dflash_ds.kinds.dflash import (
    DFlashDraftModel, DFlashDraftObjective, dflash_generate, init_from_target, make_draft_config,
)
from dflash_ds.kinds.dflash.dflash_artifact import load_dflash_draft, read_standalone_meta, save_dflash_draft
from dflash_ds.kinds.dflash.dflash_model import init_draft_head
from dflash_ds.kinds.dflash.draft_vocab import (
    DraftVocab, build_draft_vocab, choose_draft_vocab, count_answer_tokens, coverage, run_draft_vocab,
    target_to_draft,
)
from dflash_ds.loss import LossConfig, reference_ce_kl_loss

MASK, VOCAB = 95, 96


# ---------------------------------------------------------------------------------------------------------------
# choosing the vocabulary


def test_most_frequent_tokens_ties_to_the_lower_id_and_eos_always_kept():
    counts = torch.tensor([5, 0, 9, 5, 1, 7, 0, 5])
    v = choose_draft_vocab(counts, 4)
    assert v.ids == (0, 2, 3, 5)  # 9, 7, then the 5s in id order: 0 and 3 (7 left out)
    v = choose_draft_vocab(counts, 4, keep=[6])  # a never-written EOS id still goes in
    assert v.ids == (0, 2, 5, 6)
    assert coverage(v, counts) == pytest.approx((5 + 9 + 7) / 32)
    with pytest.raises(ValueError, match=r"--draft-vocab must be in \[1, 8\)"):
        choose_draft_vocab(counts, 9)
    with pytest.raises(ValueError, match="smaller than the 2 EOS ids"):
        choose_draft_vocab(counts, 1, keep=[1, 2])


def test_d2t_is_the_published_offset_table():
    v = DraftVocab((1, 2, 5, 9), 12)
    assert v.d2t().tolist() == [1, 1, 3, 6]  # target id = draft id + d2t[draft id]
    assert DraftVocab.from_d2t(v.d2t(), 12) == v
    assert target_to_draft(v.id_tensor(), 12).tolist() == [-1, 0, 1, -1, -1, 2, -1, -1, -1, 3, -1, -1]
    with pytest.raises(ValueError, match="strictly ascending"):
        DraftVocab((2, 1), 12)
    with pytest.raises(ValueError, match=r"in \[0, 12\)"):
        DraftVocab((1, 12), 12)


def test_only_answer_tokens_count_and_every_20th_example_is_held_out():
    examples = [{"input_ids": [1, 2, 3, 4], "loss_mask": [0, 0, 1, 1]} for _ in range(40)]
    examples[0] = examples[20] = {"input_ids": [1, 2, 5, 5], "loss_mask": [0, 0, 1, 1]}  # the held-out ones
    counts = count_answer_tokens(examples[1:3], 8)
    assert counts.tolist() == [0, 0, 0, 2, 2, 0, 0, 0]  # the prompt's 1 and 2 never count
    vocab, report = build_draft_vocab(examples, 2, 8, keep=[])
    assert vocab.ids == (3, 4) and (report.counted_examples, report.held_out_examples) == (38, 2)
    assert report.coverage_train == 1.0 and report.coverage_held_out == 0.0


def test_the_run_keeps_its_choice_and_refuses_another_size(tmp_path):
    examples = [{"input_ids": [1, 2, 3], "loss_mask": [1, 1, 1]}] * 3
    assert run_draft_vocab(tmp_path, None, examples, 8, []) is None
    v = run_draft_vocab(tmp_path, 3, examples, 8, [7])
    assert v.ids == (1, 2, 7)
    assert json.loads((tmp_path / "draft_vocab.json").read_text())["keep"] == [7]
    assert run_draft_vocab(tmp_path, 3, None, 8, []) == v  # a resumed run (or another rank) reads the file
    with pytest.raises(ValueError, match="--draft-vocab 3 or another --output-dir"):
        run_draft_vocab(tmp_path, 4, examples, 8, [])
    (tmp_path / "draft_vocab.json").write_text("{")
    with pytest.raises(ValueError, match="draft_vocab.json: not a draft vocabulary file"):
        run_draft_vocab(tmp_path, 3, None, 8, [])


# ---------------------------------------------------------------------------------------------------------------
# the drafter with its own head


def _target(seed=0, **kw):
    target = tiny_model("qwen3", seed=seed, num_hidden_layers=6, **kw)
    target.generation_config.eos_token_id = None
    return target


def _vocab_drafter(target, ids, block_size=4, train_head=False, init=True, seed=1):
    torch.manual_seed(seed)
    cfg = make_draft_config(target.config, 2, block_size=block_size, mask_token_id=MASK, draft_vocab_size=len(ids))
    drafter = DFlashDraftModel(cfg, train_head=train_head)
    if init:
        init_from_target(drafter, target)
    init_draft_head(drafter, target.lm_head.weight.detach(), torch.tensor(ids))
    return drafter.eval()


def test_the_head_is_the_targets_rows_and_trains_only_when_asked():
    target = _target()
    ids = list(range(0, VOCAB, 3))
    frozen, trained = _vocab_drafter(target, ids), _vocab_drafter(target, ids, train_head=True)
    torch.testing.assert_close(frozen.lm_head.weight, target.lm_head.weight[ids], rtol=0, atol=0)
    assert frozen.vocab_ids().tolist() == ids and frozen.draft_ids_to_target(torch.tensor([0, 2])).tolist() == [0, 6]
    assert "lm_head.weight" not in dict(frozen.named_parameters())  # a buffer: outside the optimizer
    assert "lm_head.weight" in dict(trained.named_parameters())
    assert {"lm_head.weight", "d2t"} <= set(frozen.state_dict())
    with pytest.raises(ValueError, match=r"--draft-vocab must be in \[1, 96\)"):
        make_draft_config(target.config, 1, block_size=4, mask_token_id=MASK, draft_vocab_size=VOCAB)


@pytest.mark.parametrize("train_head,drop_outside", [(False, False), (True, False), (False, True)],
                         ids=["frozen", "trained", "frozen_drop_outside"])
def test_objective_equals_the_plain_reference_over_the_draft_vocabulary(train_head, drop_outside):
    """One step's loss and gradients equal a materialised reference: the block rows through the draft head, labels
    as draft ids (-1 outside: no CE; dropped: no term at all), the teacher the target's final rows through the target's rows of the
    vocabulary."""
    target = _target()
    ids = list(range(0, VOCAB, 2))  # half the vocabulary: many labels fall outside
    drafter = _vocab_drafter(target, ids, train_head=train_head)
    loss_cfg = LossConfig(ce_weight=1.0, kl_weight=0.5, chunk_size=5)
    objective = DFlashDraftObjective(target, drafter, loss_cfg, drop_outside=drop_outside)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, MASK, (2, 24), generator=g)
    attention_mask = torch.ones_like(input_ids)
    loss_mask = torch.zeros_like(input_ids)
    loss_mask[:, 8:] = 1
    layout = build_block_layout(input_ids, loss_mask, attention_mask,
                                BlockConfig(block_size=4, num_anchors=3, mask_token_id=MASK), [11, 12])
    out = objective(input_ids, attention_mask, layout)
    params = [p for p in drafter.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)

    features, final = objective.target_pass(input_ids, attention_mask, layout.position_ids[:, :24])
    hidden = objective.block_hidden_states(attention_mask, layout, features)
    sup = layout.labels != -100
    labels = target_to_draft(torch.tensor(ids), VOCAB)[layout.labels[sup]]
    assert (labels < 0).any() and (labels >= 0).any()  # both kinds of rows are in the batch
    teacher = final.gather(1, layout.teacher_positions[..., None].expand(-1, -1, final.shape[-1]))[sup]
    weights = layout.weights[sup] * (labels >= 0) if drop_outside else layout.weights[sup]
    ref = reference_ce_kl_loss(hidden[sup], drafter.lm_head.weight, labels, weights, teacher, loss_cfg,
                               target.lm_head.weight[ids])
    ref_grads = torch.autograd.grad(ref, params)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert (("lm_head.weight" in dict(drafter.named_parameters())) == train_head)


@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_greedy_decoding_over_a_draft_vocabulary_equals_generate(block_size):
    """Drafts only from a third of the vocabulary, mapped through d2t: the output is still the target's greedy."""
    target = _target()
    ids = sorted(set(range(0, VOCAB, 3)) | {5, 7})
    drafter = _vocab_drafter(target, ids, block_size=block_size)
    drafted = set()
    for prompt in prompts():
        ref = hf_greedy(target, prompt, 3 * block_size + 1)
        r = dflash_generate(target, drafter, prompt, 3 * block_size + 1, eos_token_ids=[], block_size=block_size,
                            step_callback=lambda st: drafted.update(st.drafted))
        assert r.output_ids == ref
    assert drafted and drafted <= set(ids)  # every draft a target id inside the vocabulary


@pytest.mark.slow
def test_sampling_over_a_draft_vocabulary_is_lossless():
    """1000 seeded runs: the first two tokens' joint is the target's exact distribution (chi-square, p > 1e-3),
    though the drafter's q is zero on 3 of the 8 tokens."""
    V, T, mask = 8, 1.0, 7
    target = tiny_model("qwen3", seed=5, vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)
    torch.manual_seed(6)
    ids = [0, 2, 3, 5, 7]
    drafter = DFlashDraftModel(make_draft_config(target.config, 1, target_layer_ids=[0], block_size=3,
                                                 mask_token_id=mask, draft_vocab_size=len(ids))).eval()
    init_draft_head(drafter, target.lm_head.weight.detach(), torch.tensor(ids))
    prompt = [1, 4, 6]
    exact = _exact_two_token_distribution(target, prompt, T)
    counts, accepted, rejected = sampled_first_two(target, drafter, prompt, T)
    assert accepted > 100 and rejected > 100, (accepted, rejected)
    assert counts.reshape(V, V)[[1, 4, 6]].sum() > 50  # tokens outside the vocabulary are still written
    stat, p = _chi_square_pvalue(counts, exact)
    assert p > 1e-3, f"sampling over a draft vocabulary is not lossless: chi2={stat:.1f}, p={p:.2e}"


def test_export_holds_the_head_and_d2t_and_loads_back(tmp_path):
    target = _target()
    ids = list(range(10, 60))
    drafter = _vocab_drafter(target, ids)
    out = save_dflash_draft(drafter, tmp_path / "d", target.config)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 50 and cfg["has_own_lm_head"] is True and cfg["vocab_size"] == VOCAB
    assert read_standalone_meta(out).draft_vocab_size == 50
    back = load_dflash_draft(out)
    assert back.vocab_ids().tolist() == ids
    torch.testing.assert_close(back.lm_head.weight, drafter.lm_head.weight, rtol=0, atol=0)
    prompt = prompts()[0]
    assert dflash_generate(target, back, prompt, 9).output_ids == dflash_generate(target, drafter, prompt, 9).output_ids
