"""``vitask data check``: validate MedMNIST files before a run spends time on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitask_pl.data.cards import read_cards
from vitask_pl.data.catalog import SPLITS, check_size, dataset_specs, medmnist_info, resolve_flags
from vitask_pl.data.files import UNREADABLE, md5sum, npz_path, official_md5, split_problems
from vitask_pl.errors import ConfigError


def check_file(path: Path, spec, size: int, card: dict | None = None) -> tuple[dict[str, int], str, list[str]]:
    """``(samples per split, provenance, problems)`` of one file; an imported dataset's against its ``card``."""
    if not path.is_file():
        return {}, "-", [f"missing: {path}"]
    counts, problems = {}, []
    try:
        with np.load(path) as npz:
            for split in SPLITS:
                keys = (f"{split}_images", f"{split}_labels")
                absent = [k for k in keys if k not in npz.files]
                if absent:
                    problems.append(f"no key {absent[0]!r}")
                    continue
                images, labels = npz[keys[0]], npz[keys[1]]
                counts[split] = len(images)
                problems += split_problems(spec, size, split, images, labels)
    except UNREADABLE as err:
        return counts, "-", [f"not a readable .npz ({type(err).__name__}: {err}); replace it"]
    if card is not None:  # an imported dataset: its card records what the import wrote
        if counts != card["n_samples"]:
            problems.append(f"split sizes {counts} differ from its card's {card['n_samples']}; import it again")
        return counts, f"imported ({card['source'].get('kind', '?')})", problems
    official = medmnist_info(spec.flag)["n_samples"]
    if counts == official:  # the sample counts claim an official file: then its checksum must match too
        expected = official_md5(spec.flag, size)
        provenance = "official" if md5sum(path) == expected else "official counts, MD5 MISMATCH"
        if provenance != "official":
            problems.append(f"MD5 differs from medmnist.INFO ({expected}); re-download the file")
    else:
        provenance = "custom (MD5 n/a)"
    return counts, provenance, problems


def check(root: str = "data/medmnist", datasets: str | list[str] = "all", size: int = 28) -> bool:
    """Check MedMNIST files under ``root``: presence, keys, dtypes, shapes, channels, label ranges, MD5; an
    imported dataset's against its card (split sizes) instead of the MD5.

    Args:
        root: folder with ``{flag}.npz`` / ``{flag}_{size}.npz`` files (and imported datasets' cards).
        datasets: a flag or imported dataset, a list of them, or ``all`` (the twelve flags).
        size: image size, one of 28, 64, 128, 224.
    """
    cards = read_cards(root, datasets, "--datasets")
    specs = dataset_specs(resolve_flags(datasets, option="--datasets", cards=cards), cards)
    size = check_size(size, option="--size")
    header = f"{'dataset':<16}{'file':<24}{'train':>8}{'val':>8}{'test':>8}  {'provenance':<30}status"
    print(header)
    bad = 0
    for spec in specs:
        path = npz_path(root, spec.flag, size)
        counts, provenance, problems = check_file(path, spec, size, cards.get(spec.flag))
        bad += bool(problems)
        status = "ok" if not problems else "; ".join(problems)
        cells = "".join(f"{counts.get(s, '-'):>8}" for s in SPLITS)
        print(f"{spec.flag:<16}{path.name:<24}{cells}  {provenance:<30}{status}")
    if bad:
        raise ConfigError(f"--root {root}: {bad} of {len(specs)} files failed the check (see the table above).")
    print(f"all {len(specs)} files under {root} are valid")
    return True
