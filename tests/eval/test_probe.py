"""Linear probes: the ceiling they report must come from the features, not from the fitting code."""

import numpy as np
import torch

from vitask_pl.data.catalog import dataset_specs
from vitask_pl.eval.probe import fit_logistic, probe, targets


def _splits(spec, signal: float, seed: int = 0, n: int = 120, d: int = 16):
    """Features whose first coordinates encode the class with strength ``signal`` (0: pure noise)."""
    g = np.random.default_rng(seed)
    feats, labels = {}, {}
    for split in ("train", "val", "test"):
        y = g.integers(0, spec.num_classes, n)
        x = g.normal(size=(n, d))
        x[np.arange(n), y] += signal
        feats[split], labels[split] = torch.from_numpy(x).float(), y[:, None]
    return feats, labels


def test_probe_reads_out_separable_features_and_stays_at_chance_on_noise():
    spec = dataset_specs(["dermamnist"])[0]  # 7 classes
    assert probe(spec, *_splits(spec, signal=6.0))["acc"] > 0.95
    noise = probe(spec, *_splits(spec, signal=0.0))["acc"]
    assert noise < 1 / 7 + 0.12


def test_logistic_regression_matches_an_independent_gradient_descent():
    """The L-BFGS solution reaches the optimum of the same objective that plain gradient descent finds."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 5, generator=g), torch.randint(0, 3, (80,), generator=g)
    l2 = 1e-2
    w, b = fit_logistic(x, torch.nn.functional.one_hot(y, 3), multi_label=False, l2=l2, steps=200)
    w_ref = torch.zeros(5, 3, dtype=torch.float64, requires_grad=True)
    b_ref = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w_ref, b_ref], lr=0.5)
    for _ in range(4000):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x.double() @ w_ref + b_ref, y) + l2 * (w_ref**2).sum()
        loss.backward()
        opt.step()
    torch.testing.assert_close(w, w_ref.detach(), atol=2e-3, rtol=0)
    torch.testing.assert_close(b, b_ref.detach(), atol=2e-3, rtol=0)


def test_multi_label_targets_and_probe():
    spec = dataset_specs(["chestmnist"])[0]
    g = np.random.default_rng(0)
    labels = {s: (g.random((100, 14)) < 0.3).astype(np.int64) for s in ("train", "val", "test")}
    feats = {s: torch.from_numpy(4.0 * y + g.normal(size=y.shape)).float() for s, y in labels.items()}
    assert torch.equal(targets(spec, labels["test"]), torch.from_numpy(labels["test"]))
    assert probe(spec, feats, labels)["acc"] > 0.95
