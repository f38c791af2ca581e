import pytest
import torch

from dflash_ds.loss import LossConfig, accepted_lengths, fused_ce_kl_loss, reference_ce_kl_loss


def _rows(n=37, H=24, V=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, H, generator=g, dtype=torch.float64).float().requires_grad_(True)
    teacher = torch.randn(n, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (n,), generator=g)
    w = torch.rand(n, generator=g) + 0.1
    return student, weight, labels, w, teacher


CASES = [
    LossConfig(ce_weight=1.0, kl_weight=0.0),
    LossConfig(ce_weight=0.0, kl_weight=1.0),
    LossConfig(ce_weight=0.7, kl_weight=0.3, kl_temperature=2.0),
    LossConfig(ce_weight=0.6, kl_weight=1.3),  # the default objective's shared-softmax path
    LossConfig(ce_weight=0.0, kl_weight=1.0, kl_type="reverse"),
    LossConfig(ce_weight=0.5, kl_weight=1.0, kl_type="reverse"),
    LossConfig(ce_weight=0.5, kl_weight=1.0, kl_type="tvd", kl_temperature=0.7),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"ce{c.ce_weight}-kl{c.kl_weight}-{c.kl_type}")
@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])
def test_fused_equals_materialised_reference(cfg, chunk):
    cfg = LossConfig(**{**cfg.__dict__, "chunk_size": chunk})
    student, weight, labels, w, teacher = _rows()
    weight.requires_grad_(False)
    out = fused_ce_kl_loss(student, weight, labels, w, teacher, cfg)
    (g_fused,) = torch.autograd.grad(out.loss * 1.7, student)
    s2 = student.detach().clone().requires_grad_(True)
    ref = reference_ce_kl_loss(s2, weight, labels, w, teacher, cfg)
    (g_ref,) = torch.autograd.grad(ref * 1.7, s2)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-6)
    expected_correct = (student.detach() @ weight.t()).argmax(-1) == labels
    assert torch.equal(out.correct, expected_correct)


def test_components_reported_separately():
    student, weight, labels, w, teacher = _rows()
    cfg = LossConfig(ce_weight=0.25, kl_weight=2.0)
    out = fused_ce_kl_loss(student, weight, labels, w, teacher, cfg)
    ce_only = reference_ce_kl_loss(student, weight, labels, w, teacher, LossConfig(ce_weight=1.0, kl_weight=0.0))
    kl_only = reference_ce_kl_loss(student, weight, labels, w, teacher, LossConfig(ce_weight=0.0, kl_weight=1.0))
    assert out.ce.item() == pytest.approx(ce_only.item(), rel=1e-5)
    assert out.kl.item() == pytest.approx(kl_only.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(0.25 * ce_only.item() + 2.0 * kl_only.item(), rel=1e-5)


def test_kl_is_zero_when_student_equals_teacher():
    student, weight, labels, w, _ = _rows()
    out = fused_ce_kl_loss(student, weight, labels, w, student.detach(), LossConfig(ce_weight=0.0, kl_weight=1.0))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)


def test_zero_rows_gives_differentiable_zero():
    H, V = 8, 11
    student = torch.zeros(0, H, requires_grad=True)
    out = fused_ce_kl_loss(
        student, torch.randn(V, H), torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, H), LossConfig(kl_weight=1.0)
    )
    out.loss.backward()
    assert out.loss.item() == 0.0 and student.grad.shape == (0, H)


def test_frozen_head_gets_no_gradient():
    student, weight, labels, w, teacher = _rows()
    fused_ce_kl_loss(student, weight, labels, w, teacher, LossConfig(kl_weight=1.0)).loss.backward()
    assert weight.grad is None and student.grad is not None


@pytest.mark.parametrize("cfg", CASES[:4], ids=lambda c: f"ce{c.ce_weight}-kl{c.kl_weight}")
def test_draft_head_outside_labels_teacher_rows_and_head_gradient(cfg):
    """A draft-vocabulary head (the standalone drafter's own lm_head): labels -1 (outside its vocabulary) get no CE
    term, the teacher goes through other rows (the target's), and a head that requires grad gets the reference's
    gradient, in chunks."""
    cfg = LossConfig(**{**cfg.__dict__, "chunk_size": 7})
    student, weight, labels, w, teacher = _rows()
    labels[::3] = -1
    teacher_head = weight + 0.3 * torch.randn_like(weight)
    head = weight.clone().requires_grad_(True)
    out = fused_ce_kl_loss(student, head, labels, w, teacher, cfg, teacher_head)
    g_student, g_head = torch.autograd.grad(out.loss * 1.3, (student, head))
    s2, h2 = student.detach().clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = reference_ce_kl_loss(s2, h2, labels, w, teacher, cfg, teacher_head)
    r_student, r_head = torch.autograd.grad(ref * 1.3, (s2, h2))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_student, r_student, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_head, r_head, rtol=1e-4, atol=1e-6)
    assert not out.correct[labels < 0].any()  # a label the head cannot produce is never predicted right
    if cfg.ce_weight > 0:  # the CE reference without those rows' terms: they really are left out
        kept = labels >= 0
        ce = torch.nn.functional.cross_entropy((student.detach() @ weight.t())[kept], labels[kept], reduction="none")
        assert out.ce.item() == pytest.approx(((w[kept] * ce).sum() / w.sum()).item(), rel=1e-5)


def test_accepted_lengths():
    c = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert accepted_lengths(c).tolist() == [3.0, 1.0, 5.0]


def test_bad_loss_config_names_flag():
    with pytest.raises(ValueError, match="--kl-type"):
        LossConfig(kl_type="js")
    with pytest.raises(ValueError, match="--ce-weight"):
        LossConfig(ce_weight=0.0, kl_weight=0.0)
