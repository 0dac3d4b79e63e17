"""Batch builders that run in DataLoader workers. Picklable objects, so ``spawn`` workers work too."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vitask_pl.data.catalog import DatasetSpec, joint_width
from vitask_pl.data.dataset import stack_images

IGNORE = -100  # the label of every position that is not a response token (PyTorch's cross-entropy default)


def joint_targets(specs: Sequence[DatasetSpec], dataset: Sequence[int], labels: Sequence[np.ndarray]) -> torch.Tensor:
    """``(B, K)`` multi-hot targets in the joint label space (one-hot for single-label datasets)."""
    out = torch.zeros(len(dataset), joint_width(specs))
    for row, (d, label) in enumerate(zip(dataset, labels)):
        spec = specs[d]
        if spec.multi_label:
            out[row, spec.offset : spec.offset + spec.num_classes] = torch.as_tensor(label, dtype=torch.float)
        else:
            out[row, spec.offset + int(label[0])] = 1.0
    return out


class ImageBatch:
    """Samples -> ``images`` uint8 ``(B, 3, H, W)``, ``targets`` ``(B, K)``, ``dataset`` and ``index`` ``(B,)``."""

    def __init__(self, specs: Sequence[DatasetSpec]):
        self.specs = list(specs)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        dataset = [s["dataset"] for s in samples]
        return {
            "images": stack_images([s["image"] for s in samples]),
            "targets": joint_targets(self.specs, dataset, [s["label"] for s in samples]),
            "dataset": torch.tensor(dataset),
            "index": torch.tensor([s["index"] for s in samples]),
        }
