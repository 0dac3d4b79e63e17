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


def _normalise(total: torch.Tensor, rows: int, num_tokens: float | torch.Tensor | None) -> torch.Tensor:
    """``total / num_tokens`` (default: the rows given), never dividing by zero: no tokens -> 0, still a graph."""
    denominator = rows if num_tokens is None else num_tokens
    if isinstance(denominator, torch.Tensor):
        return total / denominator.clamp_min(1)
    return total / max(float(denominator), 1.0)


def response_nll(logits: torch.Tensor, targets: torch.Tensor, *, num_tokens=None) -> torch.Tensor:
    """Next-token negative log-likelihood over gathered response positions (``L_van``, ``L_EP``).

    Args:
        logits: ``(N, V)`` logits predicting each response token.
        targets: ``(N,)`` the response tokens.
        num_tokens: denominator (the global batch's response tokens under DDP); default ``N``.
    """
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    return _normalise(total, logits.shape[0], num_tokens)


def rda_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    direction: str = "reverse",
    temperature: float = 1.0,
    num_tokens=None,
) -> torch.Tensor:
    """Response distribution alignment: the VLM without the exemplar learns from itself with it.

    ``reverse`` (the paper's): mean over rows of KL(p_student || p_teacher) = sum_v p_s (log p_s - log p_t).
    ``forward``: KL(p_teacher || p_student). The teacher is detached here, whatever the caller passes: without
    the stop-gradient the paper saw no gain. With ``temperature`` T both sides use softmax(z / T) and the
    result is scaled by T^2 so gradients keep their size (Hinton et al.).

    Args:
        student_logits: ``(N, V)`` plain-view logits at response positions.
        teacher_logits: ``(N, V)`` exemplar-view logits at the same positions.
        direction: ``reverse`` or ``forward``.
        temperature: softmax temperature, > 0.
        num_tokens: denominator; default ``N``.
    """
    if direction not in ("reverse", "forward"):
        raise ValueError(f"rda_direction: {direction!r}; use 'reverse' (the paper's) or 'forward'.")
    if temperature <= 0:
        raise ValueError(f"rda_temperature: {temperature} must be > 0.")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if direction == "reverse":
        kl = (log_s.exp() * (log_s - log_t)).sum(dim=-1)
    else:
        kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return _normalise(kl.sum() * temperature**2, student_logits.shape[0], num_tokens)


def crt(pos_logits: torch.Tensor, neg_logits: torch.Tensor, targets: torch.Tensor, *, num_tokens=None) -> torch.Tensor:
    """Contrastive response tuning: the response should be likelier under its own image than another's.

    Mean over rows of ``-log softmax(z_pos - z_neg)[y]``; both branches receive gradients; no margin.

    Args:
        pos_logits: ``(N, V)`` logits with the correct image (plain view).
        neg_logits: ``(N, V)`` logits with a different-label image, same text, same positions.
        targets: ``(N,)`` the response tokens.
        num_tokens: denominator; default ``N``.
    """
    total = F.cross_entropy(pos_logits.float() - neg_logits.float(), targets, reduction="sum")
    return _normalise(total, pos_logits.shape[0], num_tokens)
