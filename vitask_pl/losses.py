"""Loss functions, pure: tensors in, scalar out. Shapes are in the docstrings.

``B`` samples, ``K`` joint classes, ``N`` gathered response positions, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def joint_classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, class_mask: torch.Tensor, multi_label: torch.Tensor
) -> torch.Tensor:
    """The TSM's loss over a joint head, each sample restricted to its own dataset's classes.

    Single-label samples: cross-entropy over their dataset's columns. Multi-label samples (ChestMNIST): binary
    cross-entropy averaged over their dataset's columns. The result is the mean over samples.

    Args:
        logits: ``(B, K)`` joint-head logits.
        targets: ``(B, K)`` multi-hot targets (one-hot for single-label samples).
        class_mask: ``(B, K)`` bool, True on the columns of each sample's dataset.
        multi_label: ``(B,)`` bool, True for samples of a multi-label dataset.
    """
    logits = logits.float()  # softmax/BCE in fp32 under bf16 autocast
    masked = logits.masked_fill(~class_mask, float("-inf"))
    ce = F.cross_entropy(masked, targets.argmax(dim=1), reduction="none")
    bce = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
    bce = (bce * class_mask).sum(dim=1) / class_mask.sum(dim=1).clamp_min(1)
    return torch.where(multi_label, bce, ce).mean()
