"""MedMNIST ``.npz`` files: where they live, what a valid one holds, how to fetch the official ones.

medmnist's own dataset classes assert the official sample counts, which rejects subsets and synthetic files,
so files are read here directly with the same layout rules: ``{flag}.npz`` at 28 px, ``{flag}_{size}.npz``
otherwise, keys ``{split}_images`` (uint8, ``(N, H, W)`` or ``(N, H, W, 3)``) and ``{split}_labels``
(``(N, 1)``, or ``(N, 14)`` multi-hot for ChestMNIST).
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitask_pl.data.arrays import mapped
from vitask_pl.data.catalog import FLAGS, SPLITS, DatasetSpec, medmnist_info
from vitask_pl.errors import ConfigError, MissingFileError, OfflineError


def npz_path(root: str | Path, flag: str, size: int) -> Path:
    return Path(root) / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")


def missing_file_message(path: Path, flag: str, size: int, *, option: str = "--data.root") -> str:
    if flag not in FLAGS:
        return (
            f"{option}: {path} not found (imported dataset {flag} at {size} px); import it at this size with "
            f"`vitask data import --name {flag} --root {path.parent} --size {size} --source ...`."
        )
    return (
        f"{option}: {path} not found (MedMNIST {flag} at {size} px). Get it with `download: true` "
        f"(--data.download true, needs internet), or write synthetic files for an offline trial with "
        f"`vitask data synth --root {path.parent} --datasets '[{flag}]' --size {size}`."
    )


@dataclass
class Split:
    """One split of one dataset, validated: images ``(N, H, W, C)`` uint8, labels ``(N, L)`` int64, and the
    row of each sample in the official file (a subset keeps them, so cached features stay addressable)."""

    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray | None = None

    def __post_init__(self):
        if self.rows is None:
            self.rows = np.arange(len(self.labels))


def split_problems(spec: DatasetSpec, size: int, split: str, images, labels) -> list[str]:
    """Everything wrong with one split's arrays (empty when valid). Shared by loading and `vitask data check`."""
    problems = []
    want_shape = (size, size) if spec.n_channels == 1 else (size, size, 3)
    if images.dtype != np.uint8:
        problems.append(f"{split}_images has dtype {images.dtype}, expected uint8")
    if images.shape[1:] != want_shape:
        channels = "gray (N, H, W)" if spec.n_channels == 1 else "RGB (N, H, W, 3)"
        problems.append(
            f"{split}_images has shape {images.shape}, expected (N, {', '.join(map(str, want_shape))}) "
            f"— {spec.flag} is {channels} at {size} px"
        )
    if len(images) == 0:
        problems.append(f"{split} split is empty")
    if labels.ndim != 2 or labels.shape != (len(images), spec.label_width):
        problems.append(f"{split}_labels has shape {labels.shape}, expected ({len(images)}, {spec.label_width})")
    elif not np.issubdtype(labels.dtype, np.integer):
        problems.append(f"{split}_labels has dtype {labels.dtype}, expected an integer type")
    elif labels.size:
        top = 1 if spec.multi_label else spec.num_classes - 1
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > top:
            problems.append(f"{split}_labels span [{lo}, {hi}], expected [0, {top}] for {spec.flag}")
    return problems


# What np.load and reading its members raise for a truncated or foreign file.
UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def load_split(root: str | Path, spec: DatasetSpec, size: int, split: str, *, memory_map: bool = False) -> Split:
    """Read and validate one split; raise a one-line error naming the file and the fix otherwise.

    ``memory_map``: the images as a read-only memory map of their one-time ``.npy`` conversion
    (:mod:`vitask_pl.data.arrays`), read sample by sample, instead of a copy in this process's memory.
    """
    path = npz_path(root, spec.flag, size)
    if not path.is_file():
        raise MissingFileError(missing_file_message(path, spec.flag, size))
    keys = (f"{split}_images", f"{split}_labels")
    try:
        with np.load(path) as npz:
            present = npz.files
            arrays = {k: npz[k] for k in keys if k in present and not (memory_map and k == keys[0])}
        if memory_map and keys[0] in present:
            arrays[keys[0]] = mapped(path, keys[0])
    except UNREADABLE as err:
        raise ConfigError(
            f"--data.root: {path} is not a readable .npz ({type(err).__name__}: {err}); it may be "
            f"truncated. Replace it: download it again, or `vitask data synth --root {path.parent} "
            f"--datasets '[{spec.flag}]' --size {size} --force`."
        ) from err
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ConfigError(
            f"--data.root: {path}: no key {missing[0]!r} (keys present: {', '.join(present)}); "
            f"a MedMNIST file has {', '.join(f'{s}_images/{s}_labels' for s in SPLITS)}."
        )
    images, labels = arrays[keys[0]], arrays[keys[1]]
    problems = split_problems(spec, size, split, images, labels)
    if problems:
        raise ConfigError(
            f"--data.root: {path}: {problems[0]}. Check the file with `vitask data check "
            f"--root {path.parent} --datasets '[{spec.flag}]' --size {size}`."
        )
    if images.ndim == 3:
        images = images[..., None]  # a view: a memory map stays one
    if not memory_map:
        images = np.ascontiguousarray(images)
    return Split(images=images, labels=labels.astype(np.int64))


def official_md5(flag: str, size: int) -> str | None:
    info = medmnist_info(flag)
    return info.get("MD5" if size == 28 else f"MD5_{size}")


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(root: str | Path, flag: str, size: int) -> Path:
    """Fetch the official file through medmnist; fail within seconds with a hint when offline."""
    import socket
    from urllib.parse import urlparse

    info = medmnist_info(flag)
    url = info["url" if size == 28 else f"url_{size}"]
    host = urlparse(url).hostname
    try:  # medmnist retries quietly and then only prints; probe the host first so offline fails fast and loud
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        raise OfflineError(
            f"--data.download true: cannot reach {host} to download {flag} ({err.__class__.__name__}). "
            f"Place the official {npz_path(root, flag, size).name} under --data.root, or write synthetic data "
            f"with `vitask data synth --root {root}`."
        ) from None
    import medmnist

    Path(root).mkdir(parents=True, exist_ok=True)
    cls = getattr(medmnist, info["python_class"])
    cls(split="train", root=str(root), download=True, size=size)
    path = npz_path(root, flag, size)
    if not path.is_file():
        raise OfflineError(f"--data.download true: medmnist did not produce {path}; download {url} by hand.")
    return path
