"""TSM features computed once per split and reused by every VITask step (docs/method.md#tsm).

The TSM is frozen, so its features are a pure function of (TSM checkpoint, image, eval transform). They are
stored per dataset split under ``{cache_dir}/{checkpoint sha256[:16]}/{flag}_{size}px_{split}_{kind}_{source}.pt``,
for every row of the data file, so any ``max_samples`` subset can look them up by row. ``source`` identifies the
data file (path, size, modification time): regenerated or other files of the same dataset get their own entry.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

from vitask_pl.atomic import save_torch, write_text
from vitask_pl.data.catalog import DatasetSpec
from vitask_pl.data.collate import ImageBatch
from vitask_pl.data.dataset import JointDataset
from vitask_pl.data.files import load_split, npz_path
from vitask_pl.models.tsm import TaskSpecificModel, extract_features


def default_cache_dir() -> Path:
    root = os.environ.get("VITASK_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vitask") / "features"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class FeatureCache:
    """Per-split TSM features on disk, rebuilt when the checkpoint, dataset, size, split or kind changes.

    Args:
        tsm: the frozen TSM (from :func:`~vitask_pl.models.tsm.load_tsm`).
        tsm_ckpt: its checkpoint file; its content hash keys the cache.
        cache_dir: where feature files live (default ``$VITASK_CACHE/features`` or ``~/.cache/vitask/features``).
        kind: ``pooled`` or ``patch``.
        batch_size: images per TSM forward while building.
    """

    def __init__(
        self,
        tsm: TaskSpecificModel,
        tsm_ckpt: str,
        cache_dir: str | None = None,
        kind: str = "pooled",
        batch_size: int = 256,
    ):
        self.tsm, self.kind, self.batch_size = tsm, kind, batch_size
        self.dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.dir = self.dir / file_sha256(tsm_ckpt)[:16]

    def path(self, root: str | Path, spec: DatasetSpec, size: int, split: str) -> Path:
        data = npz_path(root, spec.flag, size).resolve()
        stat = data.stat()
        source = hashlib.sha256(f"{data}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return self.dir / f"{spec.flag}_{size}px_{split}_{self.kind}_{source}.pt"

    def get(self, root: str | Path, spec: DatasetSpec, size: int, split: str, device="cpu") -> torch.Tensor:
        """``(N, F)`` (``(N, T, F)`` for patch) features of every row of the split; built and saved if missing.

        An entry is trusted only if its content hash matches the ``.sha256`` written after it; anything else (a
        half-copied cache, a damaged disk) is rebuilt, with a note saying why.
        """
        path = self.path(root, spec, size, split)
        digest = path.with_name(path.name + ".sha256")
        if path.is_file():
            if digest.is_file() and digest.read_text().strip() == file_sha256(path):
                return torch.load(path, map_location=device, weights_only=True)
            rank_zero_warn(f"feature cache entry {path} does not match its recorded hash; rebuilding it")
        part = load_split(root, spec, size, split, memory_map=True)  # one pass: no copy of the split in memory
        dataset = JointDataset([spec], [part])
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, collate_fn=ImageBatch([spec]), generator=torch.Generator()
        )  # never draws from the global RNG
        features = extract_features(self.tsm, loader, self.kind)["features"]
        save_torch(features, path)  # concurrent builders (DDP ranks) each publish a complete file
        write_text(digest, file_sha256(path) + "\n")
        return features.to(device)
