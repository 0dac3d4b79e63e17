"""Optimizer and schedule wiring shared by every stage (a function, not a base class)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import lightning as L
import torch


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def configure_optimizers(
    module: L.LightningModule,
    params: Iterable[torch.nn.Parameter],
    optimizer: Callable,
    scheduler: Callable | None,
    warmup_ratio: float,
) -> dict:
    """``optimizer(params)``; with ``scheduler=None``, warmup + cosine over the run's optimizer steps."""
    params = [p for p in params if p.requires_grad]
    opt = optimizer(params)
    if scheduler is not None:  # an injected scheduler steps per epoch, as Lightning's CLI expects
        return {"optimizer": opt, "lr_scheduler": scheduler(opt)}
    total = int(module.trainer.estimated_stepping_batches)
    lr_lambda = warmup_cosine(total, int(warmup_ratio * total))
    return {
        "optimizer": opt,
        "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), "interval": "step"},
    }
