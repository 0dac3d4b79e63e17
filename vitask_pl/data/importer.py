"""``vitask data import``: your own images as a dataset in the MedMNIST file layout, with its card.

Sources: a folder of class folders (``ROOT/<class>/<image>``, torchvision's ImageFolder layout) or a CSV with a
path column, a label column and optionally a split column. Images are read and preprocessed by
:mod:`vitask_pl.data.images`; the result is ``{root}/{name}[_{size}].npz`` with MedMNIST's keys, dtypes and shapes,
and ``{root}/{name}.card.json`` (:mod:`vitask_pl.data.cards`). Everything is read and checked before anything is
written, and both files are written atomically, the card last: an import that fails leaves what was there.
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from vitask_pl.data.cards import card_path, check_name, check_shared_count, make_card, read_card
from vitask_pl.data.catalog import SIZES, SPLITS, check_size, medmnist_info
from vitask_pl.data.files import npz_path
from vitask_pl.data.images import SUFFIXES, channels_of, is_image, read_image, to_array
from vitask_pl.errors import ConfigError, MissingFileError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _folder_items(source: Path) -> list[tuple[Path, str, str | None]]:
    classes = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(
            f"--source: {source} has no class folders; lay it out as {source}/<class>/<image> or give a CSV."
        )
    items = []
    for folder in classes:
        files = sorted(p for p in folder.rglob("*") if not p.name.startswith(".") and is_image(p))
        if not files:
            raise ConfigError(
                f"--source: class folder {folder} holds no image ({', '.join(SUFFIXES)}); remove it or add its images."
            )
        items += [(f, folder.name, None) for f in files]
    return items


def _csv_items(
    source: Path, image_dir: Path, path_column: str, label_column: str, split_column: str, suffix: str
) -> list[tuple[Path, str, str | None]]:
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for option, column in (("--path_column", path_column), ("--label_column", label_column)):
            if column not in columns:
                raise ConfigError(f"{option}: {source} has no column {column!r} (columns: {', '.join(columns)}).")
        rows = list(reader)
    if not rows:
        raise ConfigError(f"--source: {source} has no rows.")
    has_split = split_column in columns
    items = []
    for line, row in enumerate(rows, start=2):
        path = image_dir / f"{row[path_column]}{suffix}"
        if not path.is_file():
            raise ConfigError(
                f"--source: {source} line {line}: image {path} not found; set --image_dir (the folder the paths are "
                f"relative to) and --suffix (e.g. .png when the CSV gives ids without one)."
            )
        split = None
        if has_split:
            split = SPLIT_NAMES.get(row[split_column].strip().lower())
            if split is None:
                raise ConfigError(
                    f"--split_column: {source} line {line}: split {row[split_column]!r}; use train, val or test."
                )
        items.append((path, row[label_column].strip(), split))
    return items


def _label_space(
    raw: list[str], shares: str | None, labels: list[str] | None, name: str
) -> tuple[list[str], list[int]]:
    """The class names in label order and each item's label index.

    A raw label is a class name (case-insensitive) or its index. With ``shares`` the names are the flag's; with
    ``labels`` the given ones; otherwise the distinct raw labels, in numeric order if all are integers."""
    if shares is not None:
        info = medmnist_info(shares)
        names, option = [info["label"][str(i)] for i in range(len(info["label"]))], "--shares"
        check_shared_count(name, len(set(raw)), shares)
    elif labels is not None:
        names, option = [str(x) for x in labels], "--labels"
    else:
        distinct = sorted(set(raw), key=lambda x: (0, int(x), "") if x.lstrip("-").isdigit() else (1, 0, x))
        return distinct, [distinct.index(x) for x in raw]
    lookup = {n.lower(): i for i, n in enumerate(names)} | {str(i): i for i in range(len(names))}
    unknown = sorted({x for x in raw if x.lower() not in lookup})
    if unknown:
        raise ConfigError(
            f"--source: label {unknown[0]!r} is outside the declared set of {option} ({len(names)} classes: "
            f"{', '.join(names)}, or their indices 0-{len(names) - 1}); fix the label or the {option} option."
        )
    return names, [lookup[x.lower()] for x in raw]


def _read(path: Path) -> np.ndarray:
    try:
        return read_image(path)
    except ConfigError as err:  # the file's own problem, reported as the option it came from
        raise ConfigError(f"--source: {err}") from None


def stratified_split(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Each item's split index (0 train, 1 val, 2 test): per class, a seeded shuffle cut at the fractions, with
    at least one image of every class in every split that has a positive fraction (when the class has enough)."""
    rng = np.random.default_rng(seed)
    split = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = len(members)
        counts = [int(round(f * n)) for f in fractions[1:]]
        for k, f in enumerate(fractions[1:]):
            if f > 0 and counts[k] == 0 and n - sum(counts) > 1:
                counts[k] = 1
        val, test = counts
        split[members[:test]] = 2
        split[members[test : test + val]] = 1
    return split


def import_dataset(
    source: str,
    name: str,
    root: str = "data/imported",
    size: int = 28,
    shares: str | None = None,
    modality: str | None = None,
    task: str | None = None,
    labels: list[str] | None = None,
    channels: int | None = None,
    convert: bool = False,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    image_dir: str | None = None,
    path_column: str = "path",
    label_column: str = "label",
    split_column: str = "split",
    suffix: str = "",
    force: bool = False,
) -> Path:
    """Import image files as a dataset in the MedMNIST layout, named in ``--data.datasets`` like a flag.

    Args:
        source: a folder of class folders, or a CSV of ``path,label[,split]``.
        name: the dataset's name (lower case; not a MedMNIST flag).
        root: the data root to write into (the ``--data.root`` of later runs).
        size: image size: 28, 64, 128 or 224.
        shares: a MedMNIST flag whose label space and instruction the dataset uses (labels are its class names
            or indices), e.g. ``retinamnist`` for diabetic-retinopathy grades 0-4.
        modality: the instruction's modality phrase ("Analyze the given <modality> image."), unless ``shares``.
        task: ``multi-class``, ``binary-class`` or ``ordinal-regression`` (default: binary for 2 classes, else
            multi-class), unless ``shares``.
        labels: the class names in label order (default: the distinct labels, numerically sorted when integers).
        channels: 1 (gray) or 3 (RGB); default: what the images are, which must then agree.
        convert: convert images of the other channel count instead of refusing them.
        fractions: train/val/test fractions of the seeded stratified split, used when the CSV has no split column.
        seed: seeds the stratified split.
        image_dir: the folder the CSV's paths are relative to (default: the CSV's folder).
        path_column: the CSV column of image paths (APTOS: ``id_code``).
        label_column: the CSV column of labels (APTOS: ``diagnosis``).
        split_column: the CSV column of splits (train/val/test), if present.
        suffix: appended to each CSV path (APTOS: ``.png``).
        force: replace an existing dataset of this name and size.
    """
    check_name(name)
    size = check_size(size, option="--size")
    src = Path(source)
    if not src.exists():
        raise MissingFileError(f"--source: {src} not found; give a folder of class folders or a CSV.")
    if channels not in (None, 1, 3):
        raise ConfigError(f"--channels: {channels!r}; use 1 (gray) or 3 (RGB).")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        raise ConfigError(f"--fractions: {list(fractions)}; give train/val/test fractions >= 0 that sum to 1.")
    out, card_file = npz_path(root, name, size), card_path(root, name)
    if out.exists() and not force:
        raise ConfigError(f"--name: {out} already exists; pass --force to replace it, or choose another --name.")
    if src.is_dir():
        items = _folder_items(src)
        kind = "folder"
    else:
        base = Path(image_dir) if image_dir else src.parent
        items = _csv_items(src, base, path_column, label_column, split_column, suffix)
        kind = "csv"
    names, targets = _label_space([raw for _, raw, _ in items], shares, labels, name)
    start = time.monotonic()
    images = [_read(path) for path, _, _ in items]
    counts = Counter(channels_of(im) for im in images)
    if channels is None:
        if len(counts) > 1 and not convert:
            raise ConfigError(
                f"--source: mixed channels, {counts[1]} gray and {counts[3]} RGB images; pass --channels 1 or 3 "
                f"with --convert true to convert them, or import them apart."
            )
        channels = 3 if counts[3] >= counts[1] else 1
    try:
        arrays = [to_array(im, size, channels, convert=convert, source=str(p)) for im, (p, _, _) in zip(images, items)]
    except ConfigError as err:
        raise ConfigError(f"--source: {err}") from None
    targets = np.asarray(targets, dtype=np.int64)
    given = [s for _, _, s in items]
    if given[0] is not None:
        split = np.asarray([SPLITS.index(s) for s in given])
    else:
        split = stratified_split(targets, tuple(fractions), seed)
    n_samples = {s: int((split == k).sum()) for k, s in enumerate(SPLITS)}
    empty = [s for s, n in n_samples.items() if n == 0]
    if empty:
        raise ConfigError(
            f"--source: the {empty[0]} split would be empty ({n_samples}); add images, or set --fractions "
            f"(or the CSV's split column) so that every split has some."
        )
    card = make_card(
        name,
        labels=names,
        task=task,
        modality=modality,
        n_channels=channels,
        shares=shares,
        n_samples=n_samples,
        source={"kind": kind, "path": str(src), "seed": seed, "fractions": list(fractions)}
        if given[0] is None
        else {"kind": kind, "path": str(src), "splits": "given"},
    )
    stale = _other_card(card_file, card, size, force)
    from vitask_pl.atomic import atomic_path, write_text

    data = {}
    for k, s in enumerate(SPLITS):
        keep = np.flatnonzero(split == k)
        data[f"{s}_images"] = np.stack([arrays[i] for i in keep]).astype(np.uint8)
        data[f"{s}_labels"] = targets[keep, None].astype(np.uint8)
    manifest_path(out).unlink(missing_ok=True)  # stale once the rows change; absent beats wrong if interrupted
    with atomic_path(out) as tmp:
        np.savez_compressed(tmp, **data)
    write_text(card_file, json.dumps(card, indent=2) + "\n")
    write_manifest(out, [(SPLITS[k], str(path), names[t]) for k, (path, _, _), t in zip(split, items, targets)])
    for path in stale:  # --force over a dataset whose facts changed: its other sizes no longer match the card
        path.unlink()
        manifest_path(path).unlink(missing_ok=True)
        print(f"removed {path}: made under the replaced card")
    print(
        f"imported {len(items)} images of {len(names)} classes as {name} ({size} px, "
        f"{'gray' if channels == 1 else 'RGB'}; train/val/test {'/'.join(str(n_samples[s]) for s in SPLITS)}) "
        f"into {out} and {card_file.name} in {time.monotonic() - start:.0f} s"
        + (f"; label space and instruction of {shares}" if shares else "")
    )
    return out


def manifest_path(npz: Path) -> Path:
    return npz.with_suffix(".files.csv")


def write_manifest(npz: Path, entries: list[tuple[str, str, str]]) -> Path:
    """``{file}.files.csv`` beside the ``.npz``: which source file each row of each split is (``split,row,path,
    label``), so a prediction or a feature traces back to its image."""
    import io

    text, rows = io.StringIO(), {s: 0 for s in SPLITS}
    writer = csv.writer(text)
    writer.writerow(["split", "row", "path", "label"])
    for split, path, label in sorted(entries, key=lambda e: SPLITS.index(e[0])):  # stable: a split's file order
        writer.writerow([split, rows[split], path, label])
        rows[split] += 1
    from vitask_pl.atomic import write_text

    return write_text(manifest_path(npz), text.getvalue())


def _other_card(path: Path, card: dict, size: int, force: bool) -> list[Path]:
    """A card is shared by every size of a dataset: another size may be added only with the same facts. Returns
    the other sizes' files that ``force`` makes stale."""
    if not path.is_file():
        return []
    try:
        old = read_card(path.parent, card["name"], "--name")
    except ConfigError:  # unreadable or hand-broken: nothing of it can match, so only --force replaces it
        old = {}
    facts = ("shares", "task", "labels", "modality", "n_channels", "n_samples")
    differ = [k for k in facts if old.get(k) != card[k]]
    others = {s: npz_path(path.parent, card["name"], s) for s in SIZES if s != size}
    others = {s: p for s, p in others.items() if p.exists()}
    if not differ:
        return []
    if force:
        return list(others.values())
    raise ConfigError(
        f"--name: {card['name']} already exists under {path.parent} (sizes {sorted(others)}) with another "
        f"{differ[0]}; pass --force to replace it, or choose another --name."
    )
