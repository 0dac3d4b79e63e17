"""Faults during a run: a NaN loss, a full disk, a write that dies halfway, a damaged cache entry."""

import errno

import pytest
import torch

from vitask_pl.atomic import AtomicCheckpointIO, atomic_path, remove_temporaries
from vitask_pl.data.catalog import dataset_specs
from vitask_pl.models.feature_cache import FeatureCache
from vitask_pl.models.tsm import load_tsm

from .conftest import run, tsm_fit


def quick_tsm_fit(synth_root, out, *extra):
    return tsm_fit(
        synth_root,
        out,
        *("--data.batch_size", "4", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"),
        *extra,
    )


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(synth_root, tmp_path, capsys, monkeypatch):
    import vitask_pl.modules.tsm as tsm_module

    real, calls = tsm_module.joint_classification_loss, []

    def poisoned(*args, **kwargs):  # the third training step's loss is NaN
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(tsm_module, "joint_classification_loss", poisoned)
    code, _, err = run(
        quick_tsm_fit(synth_root, tmp_path, "--trainer.max_steps", "4", "--last_checkpoint.every_n_train_steps", "2"),
        capsys,
    )
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: training loss is nan at step 2"), err
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert str(last) in lines[-1] and "--ckpt_path last" in lines[-1]
    kept = torch.load(last, weights_only=True)
    assert kept["global_step"] == 2  # the update of the NaN step never happened, nor a save after it
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_full_disk_is_reported_before_training(synth_root, tmp_path, capsys, monkeypatch):
    import shutil

    import vitask_pl.guards as guards

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda _: usage._replace(free=1 << 20))
    code, _, err = run(quick_tsm_fit(synth_root, tmp_path / "run"), capsys)
    assert code == 2
    assert (
        err.strip().splitlines()[-1].startswith("error: --trainer.default_root_dir:")
        and "1 MiB free but this run needs" in err
    )
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_a_checkpoint_write_that_dies_halfway_leaves_the_previous_one(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        open(f, "wb").write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1


def test_atomic_path_publishes_only_complete_files(tmp_path):
    target = tmp_path / "sub" / "report.md"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt  # killed while writing
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(target.parent.iterdir()) == [target]


def test_a_killed_saves_temporary_is_removed_and_nothing_else(tmp_path, monkeypatch):
    def killed(obj, f, *args, **kwargs):  # the process dies mid-save: its temporary stays behind
        open(f, "wb").write(b"half")
        raise SystemExit(137)

    monkeypatch.setattr(torch, "save", killed)
    monkeypatch.setattr("pathlib.Path.unlink", lambda self, missing_ok=False: None)  # no cleanup runs in a SIGKILL
    with pytest.raises(SystemExit):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "last.ckpt")
    monkeypatch.undo()
    (tmp_path / "best.ckpt").write_bytes(b"kept")
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 2 and any(n.startswith(".last.") and n.endswith(".tmp.ckpt") for n in left)
    remove_temporaries(tmp_path, ".ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]


class Payload:
    def __reduce__(self):  # what a malicious checkpoint does: call something on load
        return (print, ("pwned",))


def test_checkpoints_load_weights_only(tmp_path):
    """A checkpoint that pickles an object (code on load) is refused, never executed."""
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(ValueError, match=r"--ckpt_path: .*evil.ckpt cannot be read as a checkpoint"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_a_damaged_feature_cache_entry_is_rebuilt_not_trusted(tsm_ckpt, synth_root, tmp_path):
    tsm, _ = load_tsm(tsm_ckpt)
    cache = FeatureCache(tsm, tsm_ckpt, str(tmp_path))
    spec = dataset_specs(["dermamnist"])[0]
    built = cache.get(synth_root, spec, 28, "val")
    path = cache.path(synth_root, spec, 28, "val")
    assert path.with_name(path.name + ".sha256").is_file()
    torch.save(torch.zeros_like(built), path)  # same shape, wrong content: only the hash can tell
    with pytest.warns(UserWarning, match="does not match its recorded hash"):
        again = cache.get(synth_root, spec, 28, "val")
    assert torch.equal(again, built) and torch.equal(torch.load(path, weights_only=True), built)


def test_feature_cache_entries_follow_the_data_file(tsm_ckpt, tmp_path):
    """Same TSM, same dataset, size and split, other files (regenerated data): never the other file's features."""
    from vitask_pl.data.synth import synthesize

    tsm, _ = load_tsm(tsm_ckpt)
    cache = FeatureCache(tsm, tsm_ckpt, str(tmp_path / "cache"))
    spec = dataset_specs(["dermamnist"])[0]
    synthesize(tmp_path / "a", ["dermamnist"], size=28, per_class=2)
    synthesize(tmp_path / "b", ["dermamnist"], size=28, per_class=3)
    a, b = cache.get(tmp_path / "a", spec, 28, "train"), cache.get(tmp_path / "b", spec, 28, "train")
    assert (len(a), len(b)) == (2 * 7, 3 * 7)
