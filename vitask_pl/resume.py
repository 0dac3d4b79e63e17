"""Mid-epoch resume that is bit-identical to never having stopped.

What a resumed run must get back, and where it comes from:

- weights, optimizer, LR schedule, loop counters: Lightning's checkpoint;
- the data position: :class:`ResumableLoader` (Lightning stores a train loader's ``state_dict()`` in each
  checkpoint and hands it back before iterating);
- which samples, negatives and augmentations an epoch holds: nothing to store, they are pure functions of
  ``(seed, epoch, index)`` (:class:`~vitask_pl.data.dataset.JointSampler`,
  :class:`~vitask_pl.data.negatives.NegativeSampler`, ``random_shift``);
- the global RNGs that dropout (LoRA's included) draws from: :class:`ExactResume`, which also makes sure the
  loader state is applied (see there why Lightning alone misses it here).

Data loaders get their own ``torch.Generator`` (see the data module), so creating a loader iterator never
draws from the global RNG and the training steps are its only consumer.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader


def capture_rng() -> dict:
    """The global RNG states, as tensors and plain Python values only (checkpoints load with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ExactResume(L.Callback):
    """What Lightning's resume leaves out: the global RNG states, and (in our setup) the data position.

    - RNG: stored in every checkpoint; restored right before the first resumed training batch, so whatever
      Lightning runs in between (sanity checks, loader setup) cannot shift them. Under DDP every rank gets rank
      0's state: ranks are seeded alike, and dropout masks only need to be reproducible.
    - Data: Lightning applies a loader's saved state when it builds the train loader, but
      ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (the LR schedule's length), which
      builds and iterates the loader *before* the checkpoint's loop state is restored. So at train start the
      saved state is applied and the iterator rebuilt, now at the restored epoch and position.
    """

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        return {"rng": capture_rng()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed = os.environ.get("PL_GLOBAL_SEED")
        if self._pending is None and trainer.global_step == 0 and seed is not None:
            # A fresh run: training's randomness starts from the seed, whatever setup drew (a cold feature or
            # tiny-model cache draws, a warm one does not), so a run and its resumed twin agree.
            L.seed_everything(int(seed), verbose=False)
        loop = trainer.fit_loop
        if loop._combined_loader_states_to_load and loop._data_fetcher is not None:
            loop._load_combined_loader_states()
            iter(loop._data_fetcher)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng(self._pending)
            self._pending = None


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``{dirpath}/last.ckpt`` current: every ``every_n_train_steps`` optimizer steps (mid-epoch) and when
    training ends, whatever validation said. ``--ckpt_path last`` resumes from it.

    Lightning's own ``save_last`` writes ``last.ckpt`` only when a top-k checkpoint is written, so a run whose
    final epoch did not improve the monitored metric would leave its final weights nowhere.

    Args:
        dirpath: the checkpoint folder (the CLI sets ``{default_root_dir}/checkpoints``).
        every_n_train_steps: optimizer steps between two saves; 0 saves at the end only.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 500):
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class _Skipped:
    """A batch sampler without its first ``n`` batches (their indices are drawn, their images never loaded)."""

    def __init__(self, batches, n: int):
        self.batches, self.n = batches, n

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.n, None)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.n)


class ResumableLoader(DataLoader):
    """A training DataLoader that Lightning resumes mid-epoch.

    Its state is where training stood: ``(epoch, batches already trained in it)``, read from the trainer by
    ``progress`` when a checkpoint is written. On resume, the first iteration of that same epoch skips those
    batches. The skip sits on the batch sampler, after Lightning's distributed sampler, so under DDP each rank
    skips exactly its own batches. Workers must not persist: a persistent iterator would keep the skip.

    Args:
        progress: returns ``(current epoch, batches trained in it)``.
        *args, **kwargs: those of :class:`~torch.utils.data.DataLoader`.
    """

    def __init__(self, *args, progress: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._resume_at: tuple[int, int] | None = None
        self._skip = 0

    def state_dict(self) -> dict:
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_at = (state_dict["epoch"], state_dict["batches"])

    def _get_iterator(self):
        if self._resume_at is not None:
            (epoch, batches), self._resume_at = self._resume_at, None
            self._skip = batches if epoch == self.progress()[0] else 0
        try:
            return super()._get_iterator()  # reads _index_sampler once, while the skip is set
        finally:
            self._skip = 0

    @property
    def _index_sampler(self):
        batches = super()._index_sampler
        return _Skipped(batches, self._skip) if self._skip else batches
