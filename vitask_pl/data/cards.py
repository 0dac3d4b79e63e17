"""Dataset cards: what the catalog knows about a dataset that is not one of MedMNIST's twelve.

``vitask data import`` writes ``{root}/{name}.card.json`` beside the dataset's ``.npz`` files; the catalog reads it,
so an imported dataset is named in ``--data.datasets`` exactly like a MedMNIST flag. A card either states its own
label space (task, labels, modality phrase) or **shares** a MedMNIST flag's (``"shares": "retinamnist"``): then
its labels, task and instruction are that flag's, read from ``medmnist.INFO`` as for the flag itself, and nothing
is written twice. Sharing is the paper's external-validation setting (an external diabetic-retinopathy set graded
like RetinaMNIST), and it is what lets a model tuned on the flag be scored on the new set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from vitask_pl.data.catalog import BINARY, FLAGS, MULTI_CLASS, ORDINAL, SPLITS, medmnist_info, resolve_flags
from vitask_pl.errors import ConfigError, MissingFileError, suggest

FORMAT = "vitask-dataset-card/1"
TASKS = (MULTI_CLASS, BINARY, ORDINAL)  # single-label tasks; a multi-label import is not supported
NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # a flag-like name: lower case, so it is unique on any file system


CARD_ARGS = ("name", "labels", "task", "modality", "n_channels", "shares", "n_samples")


def card_path(root: str | Path, name: str) -> Path:
    return Path(root) / f"{name}.card.json"


def check_name(name: str, option: str = "--name") -> str:
    if not NAME.match(name or ""):
        raise ConfigError(
            f"{option}: {name!r} is not a dataset name; use lower-case letters, digits and '_', starting with a letter."
        )
    if name in FLAGS:
        raise ConfigError(
            f"{option}: {name!r} is a MedMNIST flag; name the imported dataset otherwise (e.g. {name}_external), "
            f"and use --shares {name} to take its label space."
        )
    return name


def check_shared_count(name: str, n_classes: int, shares: str, option: str = "--shares") -> None:
    """A dataset that shares a flag's label space has all of its classes."""
    count = len(medmnist_info(shares)["label"])
    if n_classes != count:
        raise ConfigError(
            f"{option}: {name} has {n_classes} classes but {shares} has {count}; a shared label space needs all "
            f"of its classes (or drop --shares and give --modality and --labels)."
        )


def make_card(
    name: str,
    *,
    labels: Sequence[str] | None,
    task: str | None,
    modality: str | None,
    n_channels: int,
    shares: str | None,
    n_samples: Mapping[str, int],
    source: Mapping,
    option: str = "--shares",
) -> dict:
    """A validated card. With ``shares``, ``labels`` (the imported class names, in label order) must have the
    shared flag's label count, and task, labels and modality are left to ``medmnist.INFO``."""
    check_name(name)
    if shares is not None:
        if shares not in FLAGS:
            raise ConfigError(f"{option}: {shares!r} is not a MedMNIST flag{suggest(shares, FLAGS)}.")
        info = medmnist_info(shares)
        if info["task"] not in TASKS:
            raise ConfigError(f"{option}: {shares} is multi-label; only single-label label spaces can be shared.")
        if labels is not None:
            check_shared_count(name, len(labels), shares, option)
        labels = task = modality = None
    else:
        if not modality:
            raise ConfigError(
                f"--modality: {name} needs the modality phrase of its instruction ('Analyze the given "
                f"<modality> image.'), e.g. --modality 'fundus camera'; or --shares a MedMNIST flag."
            )
        task = task or (BINARY if len(labels or ()) == 2 else MULTI_CLASS)
        if task not in TASKS:
            raise ConfigError(f"--task: {task!r}; use one of {', '.join(TASKS)}.")
        labels = [str(label) for label in labels or ()]
        if len(labels) < 2:
            raise ConfigError(f"--source: {name} has {len(labels)} class; a classifier needs at least 2.")
    return {
        "format": FORMAT,
        "name": name,
        "shares": shares,
        "task": task,
        "labels": labels,
        "modality": modality,
        "n_channels": int(n_channels),
        "n_samples": {s: int(n_samples[s]) for s in SPLITS},
        "source": dict(source),
    }


def read_card(root: str | Path, name: str, option: str = "--data.datasets") -> dict:
    path = card_path(root, name)
    if not path.is_file():
        raise MissingFileError(
            f"{option}: unknown dataset {name!r}{suggest(name, FLAGS)}; use a MedMNIST flag "
            f"({', '.join(FLAGS)} or 'all'), or an imported dataset, whose card {path} is not there "
            f"(`vitask data import --name {name} --root {Path(root)} ...` writes it)."
        )
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{option}: {path} is not a readable card ({err}); import {name} again.") from err
    if not isinstance(card, dict) or card.get("format") != FORMAT or card.get("name") != name:
        raise ConfigError(f"{option}: {path} is not a {FORMAT} card of {name!r}; import {name} again.")
    try:  # the card's facts, checked as the import checks them (a card may have been edited by hand)
        make_card(**{k: card.get(k) for k in CARD_ARGS}, source=card.get("source") or {}, option=str(path))
    except (KeyError, TypeError) as err:
        raise ConfigError(f"{option}: {path} lacks a field ({err}); import {name} again.") from err
    return card


def read_cards(
    root: str | Path, datasets: str | Sequence[str] | None, option: str = "--data.datasets"
) -> dict[str, dict]:
    """The cards of the names in ``datasets`` that are not MedMNIST flags (empty when all are flags)."""
    if datasets is None or isinstance(datasets, str):
        datasets = [] if datasets in (None, "all") else [datasets]
    names = dict.fromkeys(str(d).lower() for d in datasets)
    return {name: read_card(root, name, option) for name in names if name not in FLAGS}


def resolve_datasets(datasets, root) -> list[str]:
    """The CLI's link from ``--data.datasets`` and ``--data.root`` to the model's ``datasets``: flags and imports."""
    return resolve_flags(datasets, cards=read_cards(root, datasets))


def cards_of(datasets, root) -> dict[str, dict] | None:
    """The CLI's link from ``--data.datasets`` and ``--data.root`` to the model's ``cards`` (``None``: flags only)."""
    return read_cards(root, datasets) or None
