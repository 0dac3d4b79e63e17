"""Where a VITask stage gets each sample's exemplar feature: a frozen TSM checkpoint, through the cache."""

from __future__ import annotations

import torch
from torch import nn

from vitask_pl.data.catalog import DatasetSpec
from vitask_pl.errors import ConfigError, MissingFileError
from vitask_pl.models.feature_cache import FeatureCache
from vitask_pl.models.tsm import FEATURE_KINDS, load_tsm


def require(path: str | None, option: str, stage: str, produced_by: str) -> str:
    if not path:
        raise MissingFileError(
            f"{option} is required for {stage}; produce it with `{produced_by}` and pass its checkpoint."
        )
    return path


class ExemplarSource(nn.Module):
    """The frozen TSM and its per-split feature tables.

    Args:
        tsm_ckpt: a TSM-stage checkpoint (``vitask fit --config configs/tsm.yaml``).
        specs: the datasets of the run, which the TSM must have been trained on.
        image_size: the run's image size, which must be the TSM's.
        kind: ``pooled`` (the CLS / pooled feature) or ``patch`` tokens.
        cache: look features up in the cache (the TSM stays out of the training step); else run the TSM.
        cache_dir: feature cache folder.
    """

    def __init__(
        self,
        tsm_ckpt: str,
        specs: list[DatasetSpec],
        image_size: int,
        *,
        kind: str = "pooled",
        cache: bool = True,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if kind not in FEATURE_KINDS:
            raise ConfigError(f"--model.init_args.exemplar.feature_kind: {kind!r}; use one of {list(FEATURE_KINDS)}.")
        tsm, hp = load_tsm(tsm_ckpt)
        trained_on = list(hp["datasets"])
        # An imported dataset that shares a flag's label space may use a TSM of that flag (the paper's external
        # validation); VITask^plug trains a TSM on the imported set itself.
        unseen = [s.flag for s in specs if s.flag not in trained_on and s.shares not in trained_on]
        if unseen:
            raise ConfigError(
                f"--model.init_args.tsm_ckpt: {tsm_ckpt} was trained on {trained_on}, not on {unseen} "
                f"of --data.datasets; train a TSM on those datasets or drop them."
            )
        if hp.get("image_size") != image_size:
            raise ConfigError(
                f"--model.init_args.tsm_ckpt: {tsm_ckpt} was trained at {hp.get('image_size')} px but "
                f"--data.size is {image_size}; use a TSM trained at {image_size} px."
            )
        self.tsm = tsm
        self.tsm_ckpt, self.specs, self.image_size, self.kind, self.use_cache = tsm_ckpt, specs, image_size, kind, cache
        self.cache = FeatureCache(tsm, tsm_ckpt, cache_dir, kind) if cache else None
        self.tables: dict[str, list[torch.Tensor]] = {}
        self.width = tsm.num_features

    def train(self, mode: bool = True):  # the TSM is frozen: dropout and BatchNorm stay in eval mode
        return super().train(False)

    def prepare(self, root: str, splits, device) -> None:
        """Load (building where missing) the feature tables of ``splits`` for every dataset."""
        if self.cache is None:
            return
        for split in splits:
            if split not in self.tables:
                self.tables[split] = [self.cache.get(root, s, self.image_size, split, device) for s in self.specs]

    @torch.no_grad()
    def features(self, batch: dict, split: str) -> torch.Tensor:
        """``(B, F)`` (or ``(B, T, F)``) exemplar features of a batch."""
        if self.cache is None:
            return self.tsm.features(batch["images"], self.kind)
        if split not in self.tables:
            raise RuntimeError(f"features of split {split!r} were not prepared")
        tables = self.tables[split]
        rows = [tables[d][i] for d, i in zip(batch["dataset"].tolist(), batch["index"].tolist())]
        return torch.stack(rows).to(batch["input_ids"].device)
