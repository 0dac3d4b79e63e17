"""The joint dataset over several MedMNIST datasets and its sampler."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vitask_pl.data.catalog import DatasetSpec
from vitask_pl.data.files import Split
from vitask_pl.data.negatives import NegativeSampler
from vitask_pl.data.prompts import instruction, response


def random_shift(image: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Pad by reflection and crop back at a random offset. No flips: OrganMNIST tells kidney-left from -right."""
    if max_shift <= 0:
        return image
    padded = np.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="reflect")
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=2)
    return padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]


class JointDataset(Dataset):
    """Samples of one split of several datasets, concatenated; each sample knows its dataset.

    A key is a global index or ``(index, epoch)``; the epoch seeds the negative draw and the augmentation so
    they change between epochs yet stay reproducible.

    A sample is a dict: ``image`` ``(H, W, C)`` uint8, ``dataset`` (position in ``specs``), ``index`` (row in
    that dataset's official split file, also under ``max_samples``), ``label`` ``(L,)`` int64, ``instruction``
    and ``response`` text, and, when negatives are on, ``negative_image`` and ``negative_index``.
    """

    def __init__(
        self,
        specs: Sequence[DatasetSpec],
        splits: Sequence[Split],
        *,
        incomplete_instruction: bool = False,
        negatives: Sequence[NegativeSampler] | None = None,
        augment_shift: int = 0,
        seed: int = 0,
    ):
        self.specs, self.splits = list(specs), list(splits)
        self.offsets = np.cumsum([0] + [len(s.labels) for s in splits])
        self.instructions = [instruction(s, incomplete=incomplete_instruction) for s in specs]
        self.negatives = negatives
        self.augment_shift = augment_shift
        self.seed = seed

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        d = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return d, index - int(self.offsets[d])

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        d, i = self.locate(int(index))
        spec, split = self.specs[d], self.splits[d]
        label = split.labels[i]
        # A copy of the one image: a memory-mapped split is read-only, and processors hand arrays to torch.
        image = np.array(split.images[i])
        if self.augment_shift:
            image = random_shift(image, np.random.default_rng([self.seed, epoch, index]), self.augment_shift)
        sample = {
            "image": image,
            "dataset": d,
            "index": int(split.rows[i]),
            "label": label,
            "instruction": self.instructions[d],
            "response": response(spec, label),
        }
        if self.negatives is not None:
            j = self.negatives[d](i, epoch)
            sample["negative_image"], sample["negative_index"] = np.array(split.images[j]), int(split.rows[j])
        return sample


class JointSampler(Sampler):
    """Yields ``(index, epoch)`` keys over a :class:`JointDataset`.

    Without ``weights`` an epoch is one pass over every sample (shuffled or in order). With ``weights``
    (one per dataset) each of ``num_samples`` draws first picks a dataset with those odds, then a sample of it,
    so a small dataset is not drowned by TissueMNIST. The epoch is read from ``epoch_fn`` when iteration
    starts, which happens in the main process, so worker processes and DDP wrapping need no extra state.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        shuffle: bool,
        weights: Sequence[float] | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        epoch_fn: Callable[[], int] = lambda: 0,
    ):
        self.sizes = np.asarray(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.shuffle, self.seed, self.epoch_fn = shuffle, seed, epoch_fn
        self.weights = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
        self.num_samples = int(num_samples or self.sizes.sum())

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(self.epoch_fn())
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is not None:
            which = rng.choice(len(self.sizes), size=self.num_samples, p=self.weights)
            indices = self.offsets[which] + (rng.random(self.num_samples) * self.sizes[which]).astype(np.int64)
        elif self.shuffle:
            indices = rng.permutation(self.num_samples)
        else:
            indices = np.arange(self.num_samples)
        return iter([(int(i), epoch) for i in indices])


def stack_images(images: Sequence[np.ndarray]) -> torch.Tensor:
    """``(H, W, 1|3)`` uint8 arrays -> ``(B, 3, H, W)`` uint8 tensor (gray repeated, so datasets can mix)."""
    batch = torch.from_numpy(np.stack([np.broadcast_to(im, (*im.shape[:2], 3)) for im in images]))
    return batch.permute(0, 3, 1, 2).contiguous()
