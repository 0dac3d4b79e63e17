"""Every file vitask writes appears whole or not at all.

A run killed mid-write (SIGKILL, OOM killer, a pre-empted node) must never leave a truncated file under the
real name that a later run trusts: files are written to a hidden sibling, flushed to disk, then renamed over
the target (``os.replace`` is atomic within a file system, and a sibling is on the same one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from vitask_pl.errors import ConfigError
from vitask_pl.fingerprint import load

TMP = ".tmp"  # the marker in every temporary name atomic_path makes: `.{stem}.{pid}.tmp{suffix}`


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is synced and renamed to ``path``.

    The temporary name keeps ``path``'s suffix (``np.savez`` and matplotlib pick the format from it) and is
    unique per process, so concurrent writers (DDP ranks) each publish a complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{TMP}{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_temporaries(folder: str | Path, suffix: str) -> None:
    """Delete what killed writers left in ``folder`` (never trusted, only taking disk space)."""
    for tmp in Path(folder).glob(f".*{TMP}{suffix}") if Path(folder).is_dir() else []:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_torch(obj: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def sibling(path: Path, tag: str) -> Path:
    """A hidden, unique name next to ``path``: same file system, so renames between them are atomic."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def publish_dir(tmp: Path, out: Path, replace: bool) -> bool:
    """Rename the finished folder ``tmp`` to ``out``; False (``tmp`` discarded) if ``out`` exists and may not be
    replaced. A replaced ``out`` is first moved aside, so at every instant ``out`` is the old or the new folder."""
    try:
        os.rename(tmp, out)  # atomic; also replaces an empty directory
        return True
    except OSError:
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    old = sibling(out, "old")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old) if old.is_dir() else old.unlink()
    return True


def is_nonempty(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def overwrite_error(out: Path) -> ConfigError:
    return ConfigError(
        f"--out: {out} already exists and is not empty; pass --force to overwrite it, or choose another --out."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with a rename-into-place save and ``weights_only=True`` loading.

    A checkpoint is data, never code: loading refuses pickled objects outright instead of executing them.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_torch(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:

        return load(path, "--ckpt_path")
