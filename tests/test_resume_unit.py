"""vitask_pl.resume's parts one by one (tests/test_resume.py kills and resumes whole `vitask fit` processes)."""

import random
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from vitask_pl.atomic import save_torch
from vitask_pl.fingerprint import load
from vitask_pl.resume import (
    ExactResume,
    LastCheckpoint,
    ResumableLoader,
    _Skipped,
    capture_rng,
    restore_rng,
    running_epoch,
)


@pytest.fixture(autouse=True)
def keep_global_rng():
    """These tests draw from and reseed the global RNGs: leave them as the next test module expects."""
    state = capture_rng()
    yield
    restore_rng(state)


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), [random.random() for _ in range(3)]


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    np.random.randn()  # a cached second gaussian (has_gauss=1) is part of numpy's state
    state = capture_rng()
    expected = draws()
    save_torch({"rng": state}, tmp_path / "a.ckpt")
    restore_rng(load(tmp_path / "a.ckpt", "--ckpt_path")["rng"])  # weights_only=True: tensors and plain values
    assert draws() == expected
    assert draws() != expected


def test_running_epoch_is_the_processed_epoch_count():
    progress = SimpleNamespace(current=SimpleNamespace(processed=3, completed=2))
    assert running_epoch(SimpleNamespace(fit_loop=SimpleNamespace(epoch_progress=progress))) == 3


def test_skipped_drops_the_first_batches_and_counts_the_rest():
    batches = [[0, 1], [2, 3], [4, 5]]
    assert list(_Skipped(batches, 2)) == [[4, 5]] and len(_Skipped(batches, 2)) == 1
    assert list(_Skipped(batches, 5)) == [] and len(_Skipped(batches, 5)) == 0


def loader(progress=lambda: (0, 0), seed=0):
    data = TensorDataset(torch.arange(10))
    return ResumableLoader(
        data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(seed), progress=progress
    )


def batches(dl) -> list[list[int]]:
    return [b[0].tolist() for b in dl]


def test_loader_state_is_the_trainers_progress_as_ints():
    dl = loader(progress=lambda: (np.int64(2), torch.tensor(3)))
    state = dl.state_dict()
    assert state == {"epoch": 2, "batches": 3} and all(type(v) is int for v in state.values())


def test_an_armed_loader_skips_the_trained_batches_of_the_same_order_once():
    full = batches(loader())
    assert sorted(sum(full, [])) == list(range(10))
    dl = loader()
    dl.load_state_dict({"epoch": 1, "batches": 2})
    assert dl.resume_state == (1, 2)
    dl.arm(1)
    assert dl.resume_state is None
    it = iter(dl)
    assert len(it) == 3  # what is left of the epoch
    assert [b[0].tolist() for b in it] == full[2:]  # the skipped batches' indices were drawn: same order after
    assert len(batches(dl)) == 5  # the next epoch is whole


def test_a_state_from_another_epoch_skips_nothing():
    dl = loader()
    dl.load_state_dict({"epoch": 1, "batches": 5})  # saved after epoch 1's last batch: epoch 2 starts afresh
    dl.arm(2)
    assert dl.resume_state is None and len(batches(dl)) == 5


def test_arm_without_a_state_skips_nothing():
    dl = loader()
    dl.arm(0)
    assert batches(dl) == batches(loader())


def test_exact_resume_stores_this_processs_rng_and_restores_it_before_the_first_batch():
    saver = ExactResume()
    saved = saver.state_dict()
    expected = draws()
    assert set(saved) == {"rng"} and len(saved["rng"]) == 1
    resumed = ExactResume()
    resumed.load_state_dict(saved)
    draws()  # whatever runs between the restore of the checkpoint and the first batch
    resumed.on_train_batch_start(SimpleNamespace(global_rank=0), None, None, 0)
    assert draws() == expected
    after = capture_rng()
    resumed.on_train_batch_start(SimpleNamespace(global_rank=0), None, None, 1)  # only once
    assert torch.equal(capture_rng()["torch"], after["torch"])


@pytest.mark.parametrize(("rank", "source"), [(1, 1), (2, 0)])
def test_each_rank_restores_its_own_rng_or_rank_zeros_if_the_checkpoint_has_fewer(rank, source):
    states = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        states.append(capture_rng())
    callback = ExactResume()
    callback.load_state_dict({"rng": states})
    callback.on_train_batch_start(SimpleNamespace(global_rank=rank), None, None, 0)
    assert torch.equal(torch.get_rng_state(), states[source]["torch"])


def idle_trainer(global_step=0):
    loop = SimpleNamespace(_combined_loader_states_to_load=[], _combined_loader=None, _data_fetcher=None)
    return SimpleNamespace(global_step=global_step, fit_loop=loop)


def test_a_fresh_run_reseeds_at_train_start_whatever_setup_drew(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    monkeypatch.setenv("PL_SEED_WORKERS", "0")
    L.seed_everything(7, verbose=False)
    expected = draws()
    draws()  # setup drew (a cold cache, say)
    ExactResume().on_train_start(idle_trainer(), None)
    assert draws() == expected


def test_a_resumed_run_is_not_reseeded(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    monkeypatch.setenv("PL_SEED_WORKERS", "0")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    resumed = ExactResume()
    resumed.load_state_dict({"rng": [capture_rng()]})
    resumed.on_train_start(idle_trainer(), None)  # a checkpoint's RNG is pending: it, not the seed, wins
    ExactResume().on_train_start(idle_trainer(global_step=4), None)  # past step 0: resumed (no RNG stored)
    assert torch.equal(torch.get_rng_state(), before)


def test_last_checkpoint_settings(tmp_path):
    cb = LastCheckpoint(dirpath=str(tmp_path), every_n_train_steps=3)
    assert (cb.save_top_k, cb.save_last, cb._every_n_train_steps, cb._enable_version_counter) == (0, True, 3, False)


class Recorded(LastCheckpoint):
    def __init__(self, events, **kwargs):
        super().__init__(**kwargs)
        self.events = events

    def _save_checkpoint(self, trainer, filepath):
        self.events.append(("save", trainer.global_step))
        super()._save_checkpoint(trainer, filepath)


class Tiny(L.LightningModule):
    def __init__(self, events):
        super().__init__()
        self.layer, self.events = torch.nn.Linear(1, 1), events

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.events.append(("val", self.global_step))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_tiny(tmp_path, every: int) -> list:
    """One epoch of 4 batches, validation after batches 2 and 4."""
    events, data = [], torch.utils.data.DataLoader(TensorDataset(torch.ones(8, 1)), batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Recorded(events, dirpath=str(tmp_path), every_n_train_steps=every)],
    )
    trainer.fit(Tiny(events), data, data)
    return events


def test_a_save_due_before_validation_waits_for_it(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"an earlier run's file")
    events = fit_tiny(tmp_path, every=1)
    # step 2: validation follows, so the save waits for it; step 4: the epoch's last batch, saved at epoch end;
    # the end of training saves nothing more (step 4 is on disk already)
    assert events == [("save", 1), ("val", 2), ("save", 2), ("save", 3), ("val", 4), ("save", 4)]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # overwritten, no last-v1.ckpt
    assert load(tmp_path / "last.ckpt", "--ckpt_path")["global_step"] == 4


def test_every_zero_saves_once_at_the_end(tmp_path):
    assert fit_tiny(tmp_path, every=0) == [("val", 2), ("val", 4), ("save", 4)]
