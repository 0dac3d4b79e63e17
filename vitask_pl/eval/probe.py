"""Linear-probe ceilings: how much of each dataset's class information a fixed representation holds.

A testbed can only tell whether a tuning method works if its baseline is trained properly. The probe gives the
reference: an L2-regularised logistic regression fitted on a dataset's train split and scored on its test split,

- on the VLM's **frozen image features** (vision tower + projector, every image token concatenated), the
  representation that instruction tuning with a frozen vision path can at best read out linearly;
- on the **raw pixels**, for scale.

The L2 strength is chosen on the validation split from a small grid. Metrics are the project's own
(:func:`vitask_pl.eval.metrics.dataset_metrics`), so a probe's ACC/F1/AUC compare with every model row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vitask_pl.data.catalog import DatasetSpec
from vitask_pl.eval.metrics import average, dataset_metrics

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, multi_label: bool, l2: float, steps: int = 100):
    """Full-batch L-BFGS logistic regression.

    Args:
        x: ``(N, D)`` standardised features.
        y: ``(N, C)`` multi-hot targets (one-hot for single-label).
        multi_label: independent sigmoids (BCE) instead of one softmax.
        l2: weight of ``sum(W**2)`` added to the mean loss.

    Returns: ``(W (D, C), b (C,))``.
    """
    n, d = x.shape
    w = torch.zeros(d, y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    x, y = x.double(), y.double()
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w + b
        if multi_label:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        else:
            loss = torch.nn.functional.cross_entropy(logits, y.argmax(dim=1))
        loss = loss + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _probabilities(x: torch.Tensor, w, b, multi_label: bool) -> torch.Tensor:
    logits = x.double() @ w + b
    return (logits.sigmoid() if multi_label else logits.softmax(dim=1)).float()


def targets(spec: DatasetSpec, labels: np.ndarray) -> torch.Tensor:
    """``(N, L)`` stored labels -> ``(N, C)`` multi-hot targets."""
    labels = torch.as_tensor(labels).long()
    if spec.multi_label:
        return labels
    return torch.nn.functional.one_hot(labels[:, 0], spec.num_classes)


def probe(spec: DatasetSpec, features: dict[str, torch.Tensor], labels: dict[str, np.ndarray]) -> dict:
    """Test metrics of the probe on ``features[split]`` ``(N, D)`` for splits train/val/test; L2 picked on val."""
    mean, std = features["train"].mean(0), features["train"].std(0).clamp_min(1e-6)
    x = {s: (f.float() - mean) / std for s, f in features.items()}
    y = {s: targets(spec, labels[s]) for s in labels}
    best = None
    for l2 in L2_GRID:
        w, b = fit_logistic(x["train"], y["train"], multi_label=spec.multi_label, l2=l2)
        val = dataset_metrics(spec, _probabilities(x["val"], w, b, spec.multi_label), y["val"])["acc"]
        if best is None or val > best[0]:
            best = (val, l2, w, b)
    _, l2, w, b = best
    return dataset_metrics(spec, _probabilities(x["test"], w, b, spec.multi_label), y["test"]) | {"l2": l2}


@torch.no_grad()
def vlm_image_features(vlm, collate, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """``(N, T * D)``: the frozen vision path's output for each image, its ``T`` image tokens concatenated.

    Images go through the processor exactly as in training (``collate.encode_images``).
    """
    prompt = collate.template.render("x")
    out = []
    for lo in range(0, len(images), batch_size):
        chunk = list(images[lo : lo + batch_size])
        enc = collate.encode_images([prompt] * len(chunk), chunk)
        pixel = {k: v for k, v in enc.items() if k not in collate.TEXT_KEYS}
        out.append(vlm.image_features(pixel).reshape(len(chunk), -1).float())
    return torch.cat(out)


def probe_table(specs: Sequence[DatasetSpec], splits: dict[str, list], featurize) -> dict:
    """``{flag: metrics, "avg": ...}`` of a probe on ``featurize(images)`` for every dataset.

    Args:
        specs: the datasets.
        splits: ``{"train"|"val"|"test": [Split per dataset]}``.
        featurize: ``(N, H, W, C) uint8 -> (N, D)`` tensor.
    """
    table = {}
    for d, spec in enumerate(specs):
        feats = {s: featurize(parts[d].images) for s, parts in splits.items()}
        table[spec.flag] = probe(spec, feats, {s: parts[d].labels for s, parts in splits.items()})
    table["avg"] = average({k: v for k, v in table.items()})
    return table


def pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
