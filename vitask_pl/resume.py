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
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader


def running_epoch(trainer: L.Trainer) -> int:
    """The epoch whose batches come next: ``trainer.current_epoch`` while training, but one more right after a
    restore from an epoch-end checkpoint, before Lightning has closed that epoch (and counted it)."""
    return trainer.fit_loop.epoch_progress.current.processed


def capture_rng() -> dict:
    """The global RNG states, as tensors and plain Python values only (checkpoints load with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
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

    - RNG: every rank's states are stored in every checkpoint and restored right before the first resumed
      training batch, so whatever Lightning runs in between (sanity checks, loader setup) cannot shift them.
    - Data: ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (the LR schedule's length),
      which builds and iterates the train loader *before* the checkpoint's loop state is restored, and a resumed
      run never re-creates that iterator. So at train start the loader's saved position is applied, the
      distributed sampler is set to the restored epoch, and the iterator is built again.
    """

    def __init__(self):
        self._pending: list[dict] | None = None
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        # Runs on every rank (each rank dumps the checkpoint, rank 0 writes it), so the states can be gathered.
        state, trainer = capture_rng(), self._trainer
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
            return {"rng": states}
        return {"rng": [state]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed = os.environ.get("PL_GLOBAL_SEED")
        if self._pending is None and trainer.global_step == 0 and seed is not None:
            # A fresh run: training's randomness starts from the seed, whatever setup drew (a cold feature or
            # tiny-model cache draws, a warm one does not), so a run and its resumed twin agree.
            L.seed_everything(int(seed), workers=os.environ.get("PL_SEED_WORKERS") == "1", verbose=False)
        loop = trainer.fit_loop
        if loop._combined_loader_states_to_load:  # restored after the early loader build: apply them now
            loop._load_combined_loader_states()
        loaders = loop._combined_loader.flattened if loop._combined_loader is not None else []
        if loop._data_fetcher is None or not any(getattr(dl, "resume_state", None) for dl in loaders):
            return
        epoch = running_epoch(trainer)
        states = [dl.resume_state for dl in loaders if isinstance(dl, ResumableLoader) and dl.resume_state]
        skip = [batches for saved, batches in states if saved == epoch]
        rank_zero_info(
            f"resuming {trainer.ckpt_path} at epoch {epoch}, batch {skip[0] if skip else 0} of "
            f"{trainer.num_training_batches} (step {trainer.global_step})"
        )
        for dl in loaders:
            _set_sampler_epoch(dl, epoch)
            if isinstance(dl, ResumableLoader):
                dl.arm(epoch)
        iter(loop._data_fetcher)  # worker iterators draw the epoch's order right here

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._pending is not None:
            states, self._pending = self._pending, None
            restore_rng(states[trainer.global_rank] if trainer.global_rank < len(states) else states[0])


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``{dirpath}/last.ckpt`` current: every ``every_n_train_steps`` optimizer steps (mid-epoch) and when
    training ends, whatever validation said. ``--ckpt_path last`` resumes from it.

    Lightning's own ``save_last`` writes ``last.ckpt`` only when a top-k checkpoint is written, so a run whose
    final epoch did not improve the monitored metric would leave its final weights nowhere. A save due on a
    batch that validation follows waits for the end of that validation, and one due on an epoch's last batch for
    the end of the epoch (after the best checkpoint's own save): resuming from a checkpoint taken before them,
    Lightning would skip that validation and the best checkpoint it might have written.

    Args:
        dirpath: the checkpoint folder (the CLI sets ``{default_root_dir}/checkpoints``).
        every_n_train_steps: optimizer steps between two saves; 0 saves at the end only.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 500):
        # No `last-v1.ckpt` when a resumed run's interval differs: the file the pipeline and `last` read stays one.
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )
        self._deferred: str | None = None  # "validation" or "epoch": the hook a due save waits for

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        n, loop = self._every_n_train_steps, trainer.fit_loop
        if n >= 1 and trainer.global_step % n == 0:
            if loop.epoch_loop.batch_progress.is_last_batch:  # after validation and every epoch-end hook
                self._deferred = "epoch"
                return
            if loop.epoch_loop._should_check_val_fx(loop._data_fetcher):
                self._deferred = "validation"
                return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._deferred == "validation":
            self._save_deferred(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._deferred == "epoch":
            self._save_deferred(trainer)

    def _save_deferred(self, trainer: L.Trainer) -> None:
        self._deferred = None
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

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
    """A training DataLoader that resumes mid-epoch.

    Its state is where training stood: ``(epoch, batches already trained in it)``, read from the trainer by
    ``progress`` when a checkpoint is written; Lightning stores it in the checkpoint and hands it back through
    ``load_state_dict``. :class:`ExactResume` then arms the skip for the restored epoch, and the next iterator
    leaves those batches out. The skip sits on the batch sampler, after Lightning's distributed sampler, so
    under DDP each rank skips exactly its own batches. Workers must not persist: a persistent iterator would keep
    the skip.

    Args:
        progress: returns ``(current epoch, batches trained in it)``; a checkpoint written after an epoch's last
            batch stands at ``(epoch + 1, 0)``.
        *args, **kwargs: those of :class:`~torch.utils.data.DataLoader`.
    """

    def __init__(self, *args, progress: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress
        self.resume_state: tuple[int, int] | None = None
        self._skip = 0

    def state_dict(self) -> dict:
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.resume_state = (state_dict["epoch"], state_dict["batches"])

    def arm(self, epoch: int) -> None:
        """The next iterator skips the batches the checkpoint had trained, if it stood in ``epoch``."""
        if self.resume_state is not None:
            (saved_epoch, batches), self.resume_state = self.resume_state, None
            self._skip = batches if saved_epoch == epoch else 0

    def _get_iterator(self):
        try:
            return super()._get_iterator()  # reads _index_sampler once, while the skip is set
        finally:
            self._skip = 0

    @property
    def _index_sampler(self):
        batches = super()._index_sampler
        return _Skipped(batches, self._skip) if self._skip else batches
