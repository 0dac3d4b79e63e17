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
