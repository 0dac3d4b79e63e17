"""Our torchmetrics-based numbers against medmnist's own Evaluator functions (and scikit-learn's F1, which medmnist's
evaluator depends on) on the same predictions."""

import pytest
import torch
from medmnist.evaluator import getACC, getAUC
from sklearn.metrics import f1_score

from vitask_pl.data.catalog import BINARY, dataset_specs
from vitask_pl.eval.metrics import PerDatasetMetrics, dataset_metrics


def random_case(spec, n, seed):
    g = torch.Generator().manual_seed(seed)
    c = spec.num_classes
    if spec.multi_label:
        target = (torch.rand(n, c, generator=g) < 0.3).long()
        target[0], target[1] = 0, 1  # both values present for every label
        probs = (0.5 * target + 0.7 * torch.rand(n, c, generator=g)).clamp(0, 1)
        return probs, target, target.numpy()
    y = torch.arange(n) % c
    logits = torch.randn(n, c, generator=g) + 1.5 * torch.nn.functional.one_hot(y, c)
    return logits.softmax(1), torch.nn.functional.one_hot(y, c), y.numpy()[:, None]


@pytest.mark.parametrize("flag", ["dermamnist", "pneumoniamnist", "chestmnist", "retinamnist", "breastmnist"])
def test_acc_and_auc_match_medmnist_evaluator(flag):
    spec = dataset_specs([flag])[0]
    probs, target, y_true = random_case(spec, 97, seed=1)
    ours = dataset_metrics(spec, probs, target)
    assert ours["acc"] == pytest.approx(getACC(y_true, probs.numpy(), spec.task), abs=1e-6)
    assert ours["auc"] == pytest.approx(getAUC(y_true, probs.numpy(), spec.task), abs=1e-6)
    assert ours["f1"] == pytest.approx(sklearn_macro_f1(spec, probs, y_true), abs=1e-6)
    assert ours["n"] == 97


def sklearn_macro_f1(spec, probs, y_true):
    """Macro-F1 of the predictions MedMNIST's evaluator makes: >0.5 per finding (multi-label), >0.5 on the positive
    class (binary), else the argmax."""
    probs = probs.numpy()
    if spec.multi_label:
        return f1_score(y_true, (probs > 0.5).astype(int), average="macro", zero_division=0)
    pred = (probs[:, 1] > 0.5).astype(int) if spec.task == BINARY else probs.argmax(1)
    return f1_score(y_true[:, 0], pred, average="macro", labels=list(range(spec.num_classes)), zero_division=0)


def test_macro_f1_against_a_hand_count():
    spec = dataset_specs(["octmnist"])[0]
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    pred = torch.tensor([0, 1, 1, 1, 2, 0, 3, 3])
    f1 = dataset_metrics(spec, torch.nn.functional.one_hot(pred, 4).float(), torch.nn.functional.one_hot(y, 4))["f1"]
    # per class: c0 p=1/2 r=1/2 -> .5; c1 p=2/3 r=1 -> .8; c2 p=1 r=1/2 -> 2/3; c3 -> 1
    assert f1 == pytest.approx((0.5 + 0.8 + 2 / 3 + 1.0) / 4)


def test_chest_exact_match():
    spec = dataset_specs(["chestmnist"])[0]
    target = torch.zeros(4, 14, dtype=torch.long)
    target[1, 3] = 1
    probs = target.float().clone()
    probs[2, 5] = 0.9  # one wrong finding in one sample
    assert dataset_metrics(spec, probs, target)["exact_match"] == pytest.approx(0.75)


def test_per_dataset_metric_splits_joint_space_and_averages():
    specs = dataset_specs(["dermamnist", "pneumoniamnist"])
    metric = PerDatasetMetrics(specs, report_invalid=True)
    pd, td, _ = random_case(specs[0], 40, 2)
    pp, tp, _ = random_case(specs[1], 30, 3)
    probs = torch.zeros(70, 9)
    targets = torch.zeros(70, 9)
    probs[:40, :7], targets[:40, :7] = pd, td.float()
    probs[40:, 7:], targets[40:, 7:] = pp, tp.float()
    dataset = torch.tensor([0] * 40 + [1] * 30)
    metric.update(probs[:35], targets[:35], dataset[:35])
    invalid = torch.zeros(70, dtype=torch.bool)
    invalid[35:] = torch.arange(35) % 5 == 0  # one dermamnist row (35) and six pneumoniamnist rows
    metric.update(probs[35:], targets[35:], dataset[35:], invalid=invalid[35:])
    out = metric.compute()
    assert out["dermamnist"] == pytest.approx(dataset_metrics(specs[0], pd, td, invalid[:40]) | {"invalid": 1 / 40})
    assert out["avg"]["acc"] == pytest.approx((out["dermamnist"]["acc"] + out["pneumoniamnist"]["acc"]) / 2)
    assert out["avg"]["n"] == 70


def test_invalid_answers_count_as_wrong_even_when_their_argmax_would_be_right():
    spec = dataset_specs(["dermamnist"])[0]
    y = torch.tensor([0, 1, 2, 0])
    onehot = torch.nn.functional.one_hot(y, 7)
    invalid = torch.tensor([True, False, False, False])
    got = dataset_metrics(spec, torch.zeros(4, 7), onehot, invalid, auc=False)  # all-zero row argmax = 0 = label
    assert got["acc"] == pytest.approx(1 / 4)  # only row 3 (pred 0 == 0); row 0 is invalid, so wrong
    assert "auc" not in got
    perfect = dataset_metrics(spec, onehot.float(), onehot, invalid, auc=False)
    assert perfect["acc"] == pytest.approx(3 / 4)
    # class 0: one hit of two (recall 1/2, precision 1) -> 2/3; classes 1, 2 perfect; absent classes 3-6 score 0
    assert perfect["f1"] == pytest.approx((2 / 3 + 1 + 1) / 7)


@pytest.mark.parametrize("flag", ["dermamnist", "pneumoniamnist", "chestmnist"])
def test_auc_can_be_left_out_for_every_task_type(flag):
    spec = dataset_specs([flag])[0]
    probs, target, _ = random_case(spec, 20, seed=4)
    assert "auc" not in dataset_metrics(spec, probs, target, auc=False)
