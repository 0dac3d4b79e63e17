"""Negative images for contrastive response tuning: same dataset, different label (docs/method.md#negatives)."""

from __future__ import annotations

import numpy as np

from vitask_pl.errors import ConfigError


class NegativeSampler:
    """Draws, for sample ``i`` of one dataset split, a uniformly random sample whose label row differs.

    For multi-label ChestMNIST "differs" means a different label vector. The draw is a pure function of
    ``(seed, epoch, i)``, so workers, restarts and ranks agree without sharing state.

    Args:
        labels: ``(N, L)`` integer label rows of one dataset split.
        seed: base seed.
        name: ``dataset/split``, for the error message.
    """

    def __init__(self, labels: np.ndarray, seed: int = 0, name: str = "dataset"):
        groups, inverse, counts = np.unique(labels, axis=0, return_inverse=True, return_counts=True)
        if len(groups) < 2:
            raise ConfigError(
                f"{name}: every sample has the same label, so no negative image of a different label exists for "
                f"contrastive response tuning; add samples of another class or leave this dataset out of --data.datasets."
            )
        self.group = inverse.reshape(-1)
        self.order = np.argsort(self.group, kind="stable")  # indices sorted by label group
        self.start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.count = counts
        self.seed = seed

    def __call__(self, i: int, epoch: int = 0) -> int:
        g = self.group[i]
        rng = np.random.default_rng([self.seed, epoch, i])
        r = int(rng.integers(len(self.group) - self.count[g]))
        if r >= self.start[g]:  # skip over the block of samples that share i's label
            r += int(self.count[g])
        return int(self.order[r])
