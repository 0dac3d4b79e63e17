"""One LightningDataModule for every stage: any subset of the twelve MedMNIST 2D datasets, jointly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from vitask_pl.data.cards import read_cards
from vitask_pl.data.catalog import FLAGS, SPLITS, DatasetSpec, check_size, dataset_specs, resolve_flags
from vitask_pl.data.dataset import JointDataset, JointSampler
from vitask_pl.data.files import Split, download, load_split, missing_file_message, npz_path
from vitask_pl.data.negatives import NegativeSampler
from vitask_pl.errors import ConfigError, MissingFileError
from vitask_pl.resume import ResumableLoader, running_epoch

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class MedMNISTDataModule(L.LightningDataModule):
    """MedMNIST 2D datasets read from ``{root}/{flag}[_{size}].npz``, one joint dataset per split.

    What a batch looks like is the model's business: the model hands its ``collate`` (its processor or
    transform) to :meth:`connect` before the loaders are built, so preprocessing runs in the workers; with
    ``negatives`` each training sample also gets one different-label image of the same dataset.

    Args:
        root: folder holding the ``.npz`` files (official, or written by ``vitask data synth``).
        datasets: a MedMNIST flag, a list of flags, or ``all`` (the twelve 2D datasets); an imported dataset
            (``vitask data import``, its card under ``root``) is named like a flag.
        size: image size: 28, 64, 128 or 224.
        download: fetch missing official files with medmnist (needs internet).
        batch_size: samples per training batch (per device).
        eval_batch_size: samples per validation/test batch; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        max_samples: keep at most this many samples per dataset and split (a seeded random subset), for quick runs.
        sampling_weights: ``{flag: weight}`` odds of drawing each dataset during training; unlisted flags get
            weight 1. Omit for one plain pass over all training samples per epoch.
        epoch_samples: training draws per epoch when ``sampling_weights`` is set (default: all training samples).
        incomplete_instruction: drop the label-set sentence from the instruction (robustness experiment).
        augment_shift: random translation in pixels for training images (0 = off). No flips (organ laterality).
        seed: seeds subsets, shuffling, negatives and augmentation.
        memory_map: read images from a memory-mapped ``.npy`` conversion of each file, made once under the cache
            (``$VITASK_CACHE/arrays``), so workers and ranks share the page cache and a process's memory does not
            grow with the dataset; ``false`` reads each split whole into memory.
    """

    def __init__(
        self,
        root: str = "data/medmnist",
        datasets: str | list[str] = "all",
        size: int = 28,
        download: bool = False,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        max_samples: int | None = None,
        sampling_weights: dict[str, float] | None = None,
        epoch_samples: int | None = None,
        incomplete_instruction: bool = False,
        augment_shift: int = 0,
        seed: int = 0,
        memory_map: bool = True,
    ):
        super().__init__()
        root = str(root)  # hparams hold plain types, so checkpoints load with weights_only=True
        self.cards = read_cards(root, datasets)  # imported datasets' facts; MedMNIST flags need none
        self.flags = resolve_flags(datasets, cards=self.cards)
        self.specs: list[DatasetSpec] = dataset_specs(self.flags, self.cards)
        self.size = check_size(size)
        self.root, self.download = Path(root), download
        for name, value in (
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("max_samples", max_samples),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"--data.{name}: {value} must be a positive integer.")
        unknown = set(sampling_weights or {}) - set(self.flags)
        if unknown:
            raise ConfigError(f"--data.sampling_weights: {sorted(unknown)} are not among --data.datasets {self.flags}.")
        if any(w < 0 for w in (sampling_weights or {}).values()):
            raise ConfigError(f"--data.sampling_weights: {sampling_weights} has a negative weight; use weights >= 0.")
        if not download:
            for flag in self.flags:
                path = npz_path(root, flag, size)
                if not path.is_file():
                    raise MissingFileError(missing_file_message(path, flag, size))
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.max_samples = num_workers, max_samples
        self.sampling_weights, self.epoch_samples = sampling_weights, epoch_samples
        self.incomplete_instruction, self.augment_shift, self.seed = incomplete_instruction, augment_shift, seed
        self.memory_map = memory_map
        self.splits: dict[str, list[Split]] = {}
        self.collate: Callable | None = None  # pushed in by the model (connect); loaders may also name their own
        self.negatives = False
        self.save_hyperparameters(ignore=["datasets"])  # the model logs the resolved list it was linked

    # -- loading -----------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.download:
            for flag in self.flags:
                if flag in FLAGS and not npz_path(self.root, flag, self.size).is_file():
                    download(self.root, flag, self.size)

    def load(self, split: str) -> list[Split]:
        """Validated arrays of ``split`` for every selected dataset (cached)."""
        if split not in self.splits:
            loaded = []
            for d, spec in enumerate(self.specs):
                part = load_split(self.root, spec, self.size, split, memory_map=self.memory_map)
                if self.max_samples is not None and len(part.labels) > self.max_samples:
                    rng = np.random.default_rng([self.seed, d, SPLITS.index(split)])
                    keep = np.sort(rng.choice(len(part.labels), self.max_samples, replace=False))
                    part = Split(part.images[keep], part.labels[keep], part.rows[keep])
                loaded.append(part)
            self.splits[split] = loaded
        return self.splits[split]

    def setup(self, stage: str | None = None) -> None:
        for split in _STAGE_SPLITS.get(stage, SPLITS):
            self.load(split)

    def dataset(self, split: str, *, negatives: bool = False) -> JointDataset:
        parts = self.load(split)
        samplers = None
        if negatives:
            samplers = [NegativeSampler(p.labels, self.seed, f"{s.flag}/{split}") for s, p in zip(self.specs, parts)]
        return JointDataset(
            self.specs,
            parts,
            incomplete_instruction=self.incomplete_instruction,
            negatives=samplers,
            augment_shift=self.augment_shift if split == "train" else 0,
            seed=self.seed,
        )

    # -- loaders -----------------------------------------------------------------------------------------

    def connect(self, collate: Callable, *, negatives: bool = False) -> None:
        """What the model needs from its batches: its ``collate`` and whether training samples carry a
        negative image (stage 2's CRT). Every stage calls this in its ``setup``, before any loader is built."""
        self.collate, self.negatives = collate, negatives

    def loader(
        self, split: str, collate_fn: Callable | None = None, *, train: bool = False, negatives: bool = False
    ) -> DataLoader:
        """A DataLoader over ``split``. ``train`` shuffles (or draws by ``sampling_weights``) and augments;
        otherwise the order and the images are deterministic (evaluation, feature export, notebooks)."""
        ds = self.dataset(split, negatives=negatives)
        sizes = [len(p.labels) for p in ds.splits]
        if train:
            weights = None if self.sampling_weights is None else [self.sampling_weights.get(f, 1.0) for f in self.flags]
            sampler = JointSampler(
                sizes,
                shuffle=True,
                weights=weights,
                num_samples=self.epoch_samples if weights else None,
                seed=self.seed,
                epoch_fn=lambda: running_epoch(self.trainer) if self.trainer is not None else 0,
            )
        else:
            ds.augment_shift = 0
            sampler = JointSampler(sizes, shuffle=False)
        kwargs = dict(
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            collate_fn=collate_fn or self._connected(),
            num_workers=self.num_workers,
            persistent_workers=False,  # workers re-fork each epoch, so nothing epoch-dependent goes stale
            # Its own generator: creating an iterator then never draws from the global RNG (see vitask_pl/resume.py).
            generator=torch.Generator().manual_seed(self.seed),
        )
        if train and self.trainer is not None:
            return ResumableLoader(ds, progress=self._train_progress, **kwargs)
        return DataLoader(ds, **kwargs)

    def _connected(self) -> Callable:
        if self.collate is None:
            raise RuntimeError(
                "MedMNISTDataModule: no collate function; the model calls datamodule.connect(collate) in its setup, "
                "or pass collate_fn to loader()."
            )
        return self.collate

    def _train_progress(self) -> tuple[int, int]:
        """``(epoch, batches trained in it)``: where a checkpoint written now stands in the data."""
        loop = self.trainer.fit_loop
        batches = loop.epoch_loop.batch_progress
        if batches.is_last_batch:  # the epoch is done: a resumed run starts the next one from its first batch
            return loop.epoch_progress.current.completed + 1, 0
        return running_epoch(self.trainer), batches.current.processed

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True, negatives=self.negatives)

    # Evaluation never reads negative images, so only training batches carry them (CRT); the Fig. 3 contrast
    # asks for them explicitly with loader(..., negatives=True).
    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test")

    def __repr__(self) -> str:
        return f"MedMNISTDataModule(root={str(self.root)!r}, datasets={self.flags}, size={self.size})"


__all__ = ["FLAGS", "MedMNISTDataModule"]
