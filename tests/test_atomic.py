"""vitask_pl.atomic: a file or folder is published whole, or the old one stays, and no temporary is left behind."""

import errno
import os

import numpy as np
import pytest
import torch

import vitask_pl.atomic as atomic
from vitask_pl.atomic import (
    TMP,
    AtomicCheckpointIO,
    atomic_path,
    is_nonempty,
    overwrite_error,
    publish_dir,
    remove_temporaries,
    save_torch,
    sibling,
    write_text,
)
from vitask_pl.errors import ConfigError, MissingFileError


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_temporary_is_a_hidden_sibling_that_keeps_the_suffix(tmp_path):
    target = tmp_path / "features.npz"
    with atomic_path(target) as tmp:
        assert tmp == tmp_path / f".features.{os.getpid()}{TMP}.npz"
        np.savez(tmp, a=np.arange(3))  # np.savez appends .npz to a name that lacks it: the suffix must be kept
        assert not target.exists()  # nothing under the real name before the body finishes
    assert names(tmp_path) == ["features.npz"]
    assert np.load(target)["a"].tolist() == [0, 1, 2]


def test_missing_parent_folders_are_created(tmp_path):
    assert write_text(tmp_path / "a" / "b" / "report.md", "x") == tmp_path / "a" / "b" / "report.md"
    assert (tmp_path / "a" / "b" / "report.md").read_text() == "x"


def test_a_body_that_raises_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    write_text(target, '{"old": 1}')
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as tmp:
        tmp.write_text('{"new": ')
        raise RuntimeError("killed")
    assert target.read_text() == '{"old": 1}'
    assert names(tmp_path) == ["results.json"]


def test_a_failed_fsync_publishes_nothing(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    save_torch({"step": 1}, target)

    def fsync_fails(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic.os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="Input/output error"):
        save_torch({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert names(tmp_path) == ["last.ckpt"]


def test_a_failed_rename_publishes_nothing(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    write_text(target, "old")

    def replace_fails(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(atomic.os, "replace", replace_fails)
    with pytest.raises(OSError, match="cross-device"):
        write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and names(tmp_path) == ["report.md"]


def test_write_text_and_save_torch_replace_the_old_content(tmp_path):
    write_text(tmp_path / "a.txt", "one")
    write_text(tmp_path / "a.txt", "two")
    save_torch({"w": torch.arange(4)}, tmp_path / "b.pt")
    save_torch({"w": torch.arange(2)}, tmp_path / "b.pt")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert torch.load(tmp_path / "b.pt", weights_only=True)["w"].tolist() == [0, 1]
    assert names(tmp_path) == ["a.txt", "b.pt"]


def test_remove_temporaries_takes_only_temporaries_of_that_suffix(tmp_path):
    for name in [".last.123.tmp.ckpt", ".best.9.tmp.ckpt", ".x.5.tmp.npz", "last.ckpt", ".hidden.ckpt", "a.tmp.ckpt"]:
        (tmp_path / name).write_bytes(b"0")
    remove_temporaries(tmp_path, ".ckpt")
    assert names(tmp_path) == [".hidden.ckpt", ".x.5.tmp.npz", "a.tmp.ckpt", "last.ckpt"]


def test_remove_temporaries_of_a_missing_folder_is_a_no_op(tmp_path):
    remove_temporaries(tmp_path / "nowhere", ".ckpt")
    assert not (tmp_path / "nowhere").exists()


def test_sibling_is_hidden_unique_and_beside_the_path(tmp_path):
    out = tmp_path / "export"
    a, b = sibling(out, "tmp"), sibling(out, "tmp")
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith(f".export.tmp-{os.getpid()}-") and len(a.name) == len(f".export.tmp-{os.getpid()}-") + 8


def make_folder(path, content):
    path.mkdir()
    (path / "file").write_text(content)
    return path


def test_publish_dir_to_a_new_or_empty_name(tmp_path):
    assert publish_dir(make_folder(tmp_path / ".new", "new"), tmp_path / "out", replace=False) is True
    assert names(tmp_path) == ["out"] and (tmp_path / "out" / "file").read_text() == "new"
    (tmp_path / "empty").mkdir()  # an empty folder is no earlier result: it is replaced even without replace
    assert publish_dir(make_folder(tmp_path / ".new", "x"), tmp_path / "empty", replace=False) is True
    assert (tmp_path / "empty" / "file").read_text() == "x"


def test_publish_dir_keeps_a_nonempty_folder_unless_replace(tmp_path):
    out = make_folder(tmp_path / "out", "old")
    assert publish_dir(make_folder(tmp_path / ".new", "new"), out, replace=False) is False
    assert names(tmp_path) == ["out"] and (out / "file").read_text() == "old"  # the new folder discarded
    assert publish_dir(make_folder(tmp_path / ".new", "new"), out, replace=True) is True
    assert names(tmp_path) == ["out"] and names(out) == ["file"] and (out / "file").read_text() == "new"


def test_publish_dir_replaces_a_file_of_that_name(tmp_path):
    (tmp_path / "out").write_text("a file")
    assert publish_dir(make_folder(tmp_path / ".new", "new"), tmp_path / "out", replace=True) is True
    assert names(tmp_path) == ["out"] and (tmp_path / "out" / "file").read_text() == "new"


def test_is_nonempty(tmp_path):
    (tmp_path / "empty").mkdir()
    make_folder(tmp_path / "full", "x")
    (tmp_path / "f").write_text("")
    assert [is_nonempty(tmp_path / n) for n in ("empty", "full", "f", "missing")] == [False, True, True, False]


def test_overwrite_error_names_the_option_and_the_fix(tmp_path):
    err = overwrite_error(tmp_path / "out")
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)
    assert str(err) == (
        f"--out: {tmp_path / 'out'} already exists and is not empty; pass --force to overwrite it, or choose "
        "another --out."
    )


def test_checkpoint_io_round_trip_and_refusals(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.arange(3.0)}, path)
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 3 and loaded["w"].tolist() == [0.0, 1.0, 2.0]
    assert names(path.parent) == ["last.ckpt"]
    with pytest.raises(TypeError, match="AtomicCheckpointIO takes no storage_options"):
        io.save_checkpoint({}, tmp_path / "other.ckpt", storage_options={"x": 1})
    assert not (tmp_path / "other.ckpt").exists()
    with pytest.raises(MissingFileError) as info:
        io.load_checkpoint(tmp_path / "missing.ckpt")
    assert str(info.value) == f"--ckpt_path: {tmp_path / 'missing.ckpt'} not found; produce it with `vitask fit`."
