import math

import torch

from vitask_pl.losses import joint_classification_loss


def naive_joint_loss(logits, targets, class_mask, multi_label):
    total = 0.0
    for b in range(logits.shape[0]):
        cols = [k for k in range(logits.shape[1]) if class_mask[b, k]]
        if multi_label[b]:
            terms = []
            for k in cols:
                p = 1 / (1 + math.exp(-logits[b, k].item()))
                t = targets[b, k].item()
                terms.append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
            total += sum(terms) / len(terms)
        else:
            z = [logits[b, k].item() for k in cols]
            y = cols.index(int(targets[b].argmax()))
            total += -(z[y] - math.log(sum(math.exp(v) for v in z)))
    return total / logits.shape[0]


def test_joint_loss_matches_naive_reference_on_odd_shapes():
    torch.manual_seed(0)
    b, k = 7, 13
    logits = torch.randn(b, k)
    class_mask = torch.zeros(b, k, dtype=torch.bool)
    targets = torch.zeros(b, k)
    multi = torch.tensor([0, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    for i in range(b):
        lo, hi = (0, 5) if multi[i] else ((5, 9) if i % 2 else (9, 13))
        class_mask[i, lo:hi] = True
        if multi[i]:
            targets[i, lo:hi] = (torch.rand(hi - lo) < 0.5).float()
        else:
            targets[i, lo + i % (hi - lo)] = 1
    got = joint_classification_loss(logits, targets, class_mask, multi)
    assert torch.allclose(got, torch.tensor(naive_joint_loss(logits, targets, class_mask, multi)), atol=1e-5)


def test_joint_loss_ignores_other_datasets_columns():
    logits = torch.zeros(1, 6, requires_grad=True)
    mask = torch.tensor([[True, True, True, False, False, False]])
    loss = joint_classification_loss(logits, torch.tensor([[0.0, 1, 0, 0, 0, 0]]), mask, torch.tensor([False]))
    loss.backward()
    assert torch.all(logits.grad[0, 3:] == 0) and loss.item() == torch.log(torch.tensor(3.0)).item()


# ---- VLM losses: each against a naive per-row, per-token reference --------------------------------------

import pytest  # noqa: E402

from vitask_pl.losses import crt, rda_kl, response_nll  # noqa: E402


def naive_kl(p_logits, q_logits, temperature=1.0):
    """mean over rows of sum_v p_v log(p_v / q_v), with p = softmax(p_logits / T), computed one row at a time."""
    total = 0.0
    for zp, zq in zip(p_logits.tolist(), q_logits.tolist()):
        ep = [math.exp(v / temperature) for v in zp]
        eq = [math.exp(v / temperature) for v in zq]
        p = [v / sum(ep) for v in ep]
        q = [v / sum(eq) for v in eq]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(p_logits)


def odd_logits(seed=0, n=5, v=11):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, v, generator=g) * 2,
        torch.randn(n, v, generator=g) * 2,
        torch.randint(0, v, (n,), generator=g),
    )


def test_rda_reverse_is_kl_student_to_teacher_and_forward_the_other_way():
    s, t, _ = odd_logits()
    assert rda_kl(s, t).item() == pytest.approx(naive_kl(s, t), rel=1e-5)
    assert rda_kl(s, t, direction="forward").item() == pytest.approx(naive_kl(t, s), rel=1e-5)
    assert abs(naive_kl(s, t) - naive_kl(t, s)) > 1e-3  # the two directions differ on these logits
    assert rda_kl(s, t, temperature=2.0).item() == pytest.approx(4.0 * naive_kl(s, t, 2.0), rel=1e-5)


def test_rda_teacher_gets_no_gradient_and_the_detach_matters():
    s, t, _ = odd_logits(1)
    student, teacher = s.clone().requires_grad_(), t.clone().requires_grad_()
    rda_kl(student, teacher).backward()
    assert teacher.grad is None or torch.all(teacher.grad == 0)

    # If teacher and student are the same tensor (one model, two views), removing the detach would add the
    # teacher path's gradient: the student's gradient would then differ.
    shared = s.clone().requires_grad_()
    rda_kl(shared, shared * 0.5 + t * 0.5).backward()
    detached_grad = shared.grad.clone()
    shared.grad = None
    log_s = torch.log_softmax(shared, -1)
    log_t = torch.log_softmax(shared * 0.5 + t * 0.5, -1)  # no detach
    (log_s.exp() * (log_s - log_t)).sum(-1).mean().backward()
    assert not torch.allclose(shared.grad, detached_grad, atol=1e-6)


def test_crt_is_cross_entropy_of_the_logit_difference_with_gradient_to_both():
    pos, neg, y = odd_logits(2, n=7, v=13)
    expected = 0.0
    for zp, zn, target in zip(pos.tolist(), neg.tolist(), y.tolist()):
        d = [a - b for a, b in zip(zp, zn)]
        expected += -(d[target] - math.log(sum(math.exp(x) for x in d)))
    pos_, neg_ = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    loss = crt(pos_, neg_, y)
    assert loss.item() == pytest.approx(expected / 7, rel=1e-5)
    loss.backward()
    assert pos_.grad.abs().sum() > 0 and neg_.grad.abs().sum() > 0
    assert torch.allclose(pos_.grad, -neg_.grad)  # d/dz_neg = -d/dz_pos for a function of (pos - neg)


def test_response_nll_and_normalisation_by_global_token_count():
    logits, _, y = odd_logits(3, n=6, v=9)
    naive = sum(-torch.log_softmax(logits[i], -1)[y[i]].item() for i in range(6))
    assert response_nll(logits, y).item() == pytest.approx(naive / 6, rel=1e-5)
    assert response_nll(logits, y, num_tokens=12).item() == pytest.approx(naive / 12, rel=1e-5)
    assert crt(logits, logits * 0, y, num_tokens=torch.tensor(3.0)).item() == pytest.approx(naive / 3, rel=1e-5)


def test_losses_are_zero_and_finite_when_a_batch_has_no_response_tokens():
    empty = torch.zeros(0, 9, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long)
    for loss in (
        response_nll(empty, targets),
        rda_kl(empty, empty),
        crt(empty, empty, targets),
        response_nll(empty, targets, num_tokens=torch.tensor(0.0)),
    ):
        assert loss.item() == 0.0 and torch.isfinite(loss)
        loss.backward()  # still part of the graph


def test_bad_rda_options():
    s, t, _ = odd_logits()
    with pytest.raises(ValueError, match="rda_direction"):
        rda_kl(s, t, direction="sideways")
    with pytest.raises(ValueError, match="rda_temperature"):
        rda_kl(s, t, temperature=0)
