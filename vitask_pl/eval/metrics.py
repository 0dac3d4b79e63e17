"""ACC, macro-F1 and AUC per dataset with MedMNIST semantics, and their average.

MedMNIST (``medmnist.Evaluator``): multi-class and ordinal take the argmax; binary thresholds the positive
class score at 0.5; multi-label thresholds every finding at 0.5 and averages the per-label accuracy. AUC is
one-vs-rest averaged over classes (over labels for multi-label). Macro-F1 is the paper's second number.
ChestMNIST also gets ``exact_match`` (all 14 findings right), the accuracy the VITask paper reports for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchmetrics.functional.classification as tmf
from torchmetrics import Metric

from vitask_pl.data.catalog import BINARY, DatasetSpec, joint_width

METRIC_NAMES = ("acc", "f1", "auc")


def dataset_metrics(
    spec: DatasetSpec,
    probs: torch.Tensor,
    target: torch.Tensor,
    invalid: torch.Tensor | None = None,
    *,
    auc: bool = True,
) -> dict[str, float]:
    """Metrics of one dataset.

    Args:
        spec: the dataset.
        probs: ``(N, C)`` class probabilities (softmax) or, for multi-label, per-finding probabilities.
        target: ``(N, C)`` multi-hot targets (one-hot for single-label datasets).
        invalid: ``(N,)`` bool, answers that matched no label: they count as wrong (for multi-label, every
            finding wrong) and, for F1, as a miss of their true class without a false positive elsewhere.
        auc: report AUC (meaningless for one-hot generated answers).
    """
    probs, target = probs.float(), target.long()
    n, c = probs.shape
    if invalid is not None and bool(invalid.any()):
        invalid = invalid.bool()
        if spec.multi_label:
            probs = torch.where(invalid[:, None], 1.0 - target.float(), probs)
        else:
            y, pred = target.argmax(dim=1), probs.argmax(dim=1).masked_fill(invalid, c)  # class c: "no valid answer"
            f1 = tmf.multiclass_f1_score(pred, y, num_classes=c + 1, average="none")[:c].mean()
            return {"acc": float((pred == y).float().mean()), "f1": float(f1), "n": n}
    if spec.multi_label:
        out = {
            "acc": tmf.multilabel_accuracy(probs, target, num_labels=c, threshold=0.5, average="macro"),
            "f1": tmf.multilabel_f1_score(probs, target, num_labels=c, threshold=0.5, average="macro"),
            "auc": tmf.multilabel_auroc(probs, target, num_labels=c, average="macro", thresholds=None),
            "exact_match": tmf.multilabel_exact_match(probs, target, num_labels=c, threshold=0.5),
        }
    else:
        y = target.argmax(dim=1)
        if spec.task == BINARY:
            pred = (probs[:, 1] > 0.5).long()  # MedMNIST: strict threshold on the positive class
            auroc = tmf.binary_auroc(probs[:, 1], y, thresholds=None)
        else:
            pred = probs.argmax(dim=1)
            auroc = tmf.multiclass_auroc(probs, y, num_classes=c, average="macro", thresholds=None)
        out = {
            "acc": (pred == y).float().mean(),
            "f1": tmf.multiclass_f1_score(pred, y, num_classes=c, average="macro"),
            "auc": auroc,
        }
    if not auc:
        out.pop("auc")
    return {k: float(v) for k, v in out.items()} | {"n": n}


def average(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over datasets (the paper's average), for every metric all datasets report."""
    names = set.intersection(*(set(r) for r in results.values())) - {"n"}
    return {k: sum(r[k] for r in results.values()) / len(results) for k in sorted(names)} | {
        "n": sum(r["n"] for r in results.values())
    }


class PerDatasetMetrics(Metric):
    """Accumulates joint-space probabilities per sample and scores each dataset at ``compute``.

    ``update(probs, targets, dataset)`` takes ``(B, K)`` probabilities and multi-hot targets in the joint
    label space and ``(B,)`` dataset positions; optional ``(B,)`` ``invalid`` flags (a generated answer that
    matched no label) add an ``invalid`` rate, always reported with ``report_invalid=True``. States are concatenated across processes under DDP.
    """

    full_state_update = False

    def __init__(self, specs: Sequence[DatasetSpec], *, report_invalid: bool = False, auc: bool = True):
        super().__init__()
        self.specs, self.report_invalid, self.auc = list(specs), report_invalid, auc
        self.width = joint_width(self.specs)
        for name in ("probs", "targets", "dataset", "invalid"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, targets: torch.Tensor, dataset: torch.Tensor, invalid=None) -> None:
        self.probs.append(probs.detach().float())
        self.targets.append(targets.detach().float())
        self.dataset.append(dataset.detach().long())
        self.invalid.append(torch.zeros_like(dataset, dtype=torch.float) if invalid is None else invalid.float())

    def compute(self) -> dict[str, dict[str, float]]:
        cat = lambda x: torch.cat(x) if isinstance(x, list) else x  # noqa: E731 (lists before sync, tensors after)
        probs, targets, dataset, invalid = (cat(self.probs), cat(self.targets), cat(self.dataset), cat(self.invalid))
        results, any_invalid = {}, bool(invalid.sum() > 0) or self.report_invalid
        for d, spec in enumerate(self.specs):
            rows = dataset == d
            if not rows.any():
                continue
            cols = slice(spec.offset, spec.offset + spec.num_classes)
            results[spec.flag] = dataset_metrics(
                spec, probs[rows, cols], targets[rows, cols], invalid[rows], auc=self.auc
            )
            if any_invalid:
                results[spec.flag]["invalid"] = float(invalid[rows].mean())
        if results:
            results["avg"] = average(results)
        return results
