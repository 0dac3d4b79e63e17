"""MedMNIST image arrays as memory-mapped ``.npy`` files, converted once per data file, read lazily.

``np.load(npz)[key]`` reads a whole split into the process's memory: at 224 px the twelve training splits hold
about 37 GB, per DataLoader worker and per DDP rank. Here each ``{split}_images`` member is streamed once, in
chunks, into an uncompressed ``.npy`` under ``{cache}/arrays/{file}-{key of path, size, mtime}/`` (written beside
its final name and renamed into place, so an interrupted conversion leaves nothing half-written), and then opened
with ``mmap_mode="r"``: a sample is read when indexed, and every process that maps the file shares the OS page
cache. Labels are small and stay ordinary arrays.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np

from vitask_pl.atomic import sibling

CHUNK = 64 << 20  # bytes copied at a time: the conversion's memory does not grow with the split


def cache_root() -> Path:
    root = os.environ.get("VITASK_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vitask") / "arrays"


def entry(path: Path) -> Path:
    """The cache folder of one data file: its name plus a key of (resolved path, size, mtime), so a replaced or
    re-downloaded file never reads a stale conversion."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / f"{path.stem}-{key}"


def mapped(path: str | Path, member: str) -> np.ndarray:
    """``npz[member]`` as a read-only memory map, converting it on first use."""
    path = Path(path)
    target = entry(path) / f"{member}.npy"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = sibling(target, "tmp")
        try:
            _stream(path, member, tmp)
            os.replace(tmp, target)  # atomic: readers see the whole file or none
        finally:
            tmp.unlink(missing_ok=True)
    return np.load(target, mmap_mode="r")


def _stream(npz: Path, member: str, out: Path) -> None:
    """Copy one ``.npy`` member of an ``.npz`` (stored or deflated) to ``out`` without holding it in memory."""
    with zipfile.ZipFile(npz) as archive, archive.open(f"{member}.npy") as src, open(out, "wb") as dst:
        fmt = np.lib.format
        version = fmt.read_magic(src)
        readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"{npz}: {member} is a .npy of format version {version}; expected 1.0 or 2.0")
        shape, fortran, dtype = readers[version](src)
        header = {"descr": fmt.dtype_to_descr(dtype), "fortran_order": fortran, "shape": shape}
        fmt.write_array_header_2_0(dst, header)
        remaining = int(np.prod(shape)) * dtype.itemsize
        while remaining:
            block = src.read(min(CHUNK, remaining))
            if not block:
                raise EOFError(f"{npz}: {member} ends {remaining} bytes early")
            dst.write(block)
            remaining -= len(block)
        dst.flush()
        os.fsync(dst.fileno())
