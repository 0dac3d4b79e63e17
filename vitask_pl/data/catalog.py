"""What is known about the twelve MedMNIST 2D datasets, in one place.

Labels, tasks and channel counts come from ``medmnist.INFO``; the only facts added here are the modality
phrase used in the instruction and the joint label space of the paper (datasets with identical label sets,
the three organ views, share one block of the head).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vitask_pl.errors import ConfigError, suggest

# The 2D datasets in medmnist's own order; the joint head follows this order.
FLAGS: tuple[str, ...] = (
    "pathmnist",
    "chestmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organamnist",
    "organcmnist",
    "organsmnist",
)

# Modality phrase of the instruction "Analyze the given {modality} image." (MedMNIST v2 paper, Table 1).
MODALITY: dict[str, str] = {
    "pathmnist": "colon pathology",
    "chestmnist": "chest X-ray",
    "dermamnist": "dermatoscope",
    "octmnist": "retinal OCT",
    "pneumoniamnist": "chest X-ray",
    "retinamnist": "fundus camera",
    "breastmnist": "breast ultrasound",
    "bloodmnist": "blood cell microscope",
    "tissuemnist": "kidney cortex microscope",
    "organamnist": "abdominal CT",
    "organcmnist": "abdominal CT",
    "organsmnist": "abdominal CT",
}

SIZES: tuple[int, ...] = (28, 64, 128, 224)
SPLITS: tuple[str, ...] = ("train", "val", "test")

MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL = (
    "multi-class",
    "binary-class",
    "multi-label, binary-class",
    "ordinal-regression",
)


@dataclass(frozen=True)
class DatasetSpec:
    """One MedMNIST dataset as the rest of the code sees it."""

    flag: str
    task: str
    labels: tuple[str, ...]
    n_channels: int
    modality: str
    offset: int  # first column of this dataset's block in the joint label space

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def multi_label(self) -> bool:
        return self.task == MULTI_LABEL

    @property
    def label_width(self) -> int:
        """Columns of the ``{split}_labels`` array: one per finding for multi-label, else one."""
        return self.num_classes if self.multi_label else 1


def medmnist_info(flag: str) -> dict:
    from medmnist import INFO  # imported lazily: medmnist pulls in pandas and scikit-learn

    return INFO[flag]


def resolve_flags(datasets: str | Sequence[str], *, option: str = "--data.datasets") -> list[str]:
    """``"all"``, one flag or a list of flags -> validated list in the order given, without duplicates."""
    if isinstance(datasets, str):
        datasets = list(FLAGS) if datasets == "all" else [datasets]
    flags = list(dict.fromkeys(str(d).lower() for d in datasets))
    if not flags:
        raise ConfigError(f"{option}: empty list; give one or more of {', '.join(FLAGS)} or 'all'.")
    for flag in flags:
        if flag not in FLAGS:
            raise ConfigError(
                f"{option}: unknown dataset {flag!r}{suggest(flag, FLAGS)}; valid flags: {', '.join(FLAGS)} or 'all'."
            )
    return flags


def check_size(size: int, *, option: str = "--data.size") -> int:
    if size not in SIZES:
        raise ConfigError(f"{option}: unsupported image size {size!r}; MedMNIST ships {', '.join(map(str, SIZES))}.")
    return int(size)


def dataset_specs(flags: Sequence[str]) -> list[DatasetSpec]:
    """Specs of ``flags`` with offsets into their joint label space.

    Datasets with identical label sets (organa/organc/organs) share one block, so all twelve give the paper's
    70-way head and a subset gives a compact one.
    """
    specs, blocks, width = [], {}, 0
    for flag in flags:
        info = medmnist_info(flag)
        labels = tuple(info["label"][str(i)] for i in range(len(info["label"])))
        if labels not in blocks:
            blocks[labels], width = width, width + len(labels)
        specs.append(DatasetSpec(flag, info["task"], labels, int(info["n_channels"]), MODALITY[flag], blocks[labels]))
    return specs


def joint_width(specs: Sequence[DatasetSpec]) -> int:
    """Width of the joint head that covers ``specs`` (70 for all twelve)."""
    return max(s.offset + s.num_classes for s in specs)
