"""What is known about the datasets, in one place: the twelve MedMNIST 2D datasets and imported ones.

Labels, tasks and channel counts of a MedMNIST flag come from ``medmnist.INFO``; the only facts added here are
the modality phrase used in the instruction and the joint label space of the paper (datasets with identical
label sets, the three organ views, share one block of the head). An imported dataset's facts come from its card
(:mod:`vitask_pl.data.cards`), which may share a flag's label space, and so its block and its instruction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    shares: str | None = None  # an imported dataset: the MedMNIST flag whose label space and instruction it uses

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


def resolve_flags(
    datasets: str | Sequence[str], *, option: str = "--data.datasets", cards: Mapping[str, dict] | None = None
) -> list[str]:
    """``"all"``, one name or a list of names -> validated list in the order given, without duplicates.

    A name is a MedMNIST flag or an imported dataset among ``cards``."""
    if isinstance(datasets, str):
        datasets = list(FLAGS) if datasets == "all" else [datasets]
    flags = list(dict.fromkeys(str(d).lower() for d in datasets))
    if not flags:
        raise ConfigError(f"{option}: empty list; give one or more of {', '.join(FLAGS)} or 'all'.")
    for flag in flags:
        if flag not in FLAGS and flag not in (cards or {}):
            raise ConfigError(
                f"{option}: unknown dataset {flag!r}{suggest(flag, FLAGS)}; valid flags: {', '.join(FLAGS)} or "
                f"'all', or a dataset written by `vitask data import` (its card under --data.root)."
            )
    return flags


def check_size(size: int, *, option: str = "--data.size") -> int:
    if size not in SIZES:
        raise ConfigError(f"{option}: unsupported image size {size!r}; MedMNIST ships {', '.join(map(str, SIZES))}.")
    return int(size)


def _flag_facts(flag: str) -> tuple[str, tuple[str, ...], str]:
    info = medmnist_info(flag)
    return info["task"], tuple(info["label"][str(i)] for i in range(len(info["label"]))), MODALITY[flag]


def dataset_specs(flags: Sequence[str], cards: Mapping[str, dict] | None = None) -> list[DatasetSpec]:
    """Specs of ``flags`` (MedMNIST flags, or imported datasets among ``cards``) with offsets into their joint
    label space.

    Datasets with identical label sets (organa/organc/organs, or a card sharing a flag's) share one block, so all
    twelve give the paper's 70-way head and a subset gives a compact one.
    """
    specs, blocks, width = [], {}, 0
    for flag in flags:
        if flag in FLAGS:
            (task, labels, modality), channels, shares = _flag_facts(flag), int(medmnist_info(flag)["n_channels"]), None
        else:
            card = (cards or {})[flag]
            shares, channels = card["shares"], int(card["n_channels"])
            if shares:
                task, labels, modality = _flag_facts(shares)
            else:
                task, labels, modality = card["task"], tuple(card["labels"]), card["modality"]
        if labels not in blocks:
            blocks[labels], width = width, width + len(labels)
        specs.append(DatasetSpec(flag, task, labels, channels, modality, blocks[labels], shares))
    return specs


def joint_width(specs: Sequence[DatasetSpec]) -> int:
    """Width of the joint head that covers ``specs`` (70 for all twelve)."""
    return max(s.offset + s.num_classes for s in specs)
