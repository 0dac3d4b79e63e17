"""vitask_pl.guards: the checks that stop a run early with one line naming the option and the fix."""

import shutil
from types import SimpleNamespace

import pytest
import torch

import vitask_pl.guards as guards
from vitask_pl.errors import ConfigError, UserError
from vitask_pl.guards import (
    FiniteLoss,
    NonFiniteLossError,
    check_output_dir,
    checkpoint_bytes,
    last_checkpoints,
    refuse_fresh_over_earlier,
)


def test_last_checkpoints_sorted_and_only_last(tmp_path):
    for name in ("last.ckpt", "last-v1.ckpt", "best-epoch00-step4.ckpt", "last.ckpt.sha256"):
        (tmp_path / name).write_bytes(b"0")
    assert last_checkpoints(tmp_path) == [tmp_path / "last-v1.ckpt", tmp_path / "last.ckpt"]
    assert last_checkpoints(tmp_path / "missing") == []


def test_checkpoint_bytes_counts_trainable_parameters_three_times_in_fp32():
    layer = torch.nn.Linear(3, 2)  # 6 weights + 2 biases
    assert checkpoint_bytes(layer) == 8 * 3 * 4
    layer.weight.requires_grad_(False)  # a frozen weight is not in a stage checkpoint, nor has optimizer state
    assert checkpoint_bytes(layer) == 2 * 3 * 4


def test_check_output_dir_leaves_no_probe_and_no_folder_it_made(tmp_path):
    check_output_dir(tmp_path / "a" / "b" / "checkpoints", need_bytes=0)
    assert list(tmp_path.iterdir()) == []  # every folder made for the probe is gone again
    (tmp_path / "existing").mkdir()
    check_output_dir(tmp_path / "existing", need_bytes=0)
    assert [p.name for p in tmp_path.iterdir()] == ["existing"] and list((tmp_path / "existing").iterdir()) == []


def test_check_output_dir_unwritable_is_one_line_naming_the_option(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    target = tmp_path / "file" / "checkpoints"
    with pytest.raises(ConfigError) as info:
        check_output_dir(target, need_bytes=0, option="--out")
    assert str(info.value) == f"--out: cannot write checkpoints to {target} (Not a directory); pass a writable folder."
    assert (tmp_path / "file").read_text() == "not a folder"


def test_check_output_dir_relative_path_is_reported_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(
        ConfigError, match=rf"^--trainer.default_root_dir: cannot write checkpoints to {tmp_path}/file/"
    ):
        check_output_dir("file/ck", need_bytes=0)


def fake_free(monkeypatch, tmp_path, free):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda _: usage._replace(free=free))


def test_check_output_dir_too_little_space(tmp_path, monkeypatch):
    fake_free(monkeypatch, tmp_path, 10 << 20)
    check_output_dir(tmp_path / "ok", need_bytes=10 << 20)  # exactly enough is enough
    with pytest.raises(ConfigError) as info:
        check_output_dir(tmp_path / "run", need_bytes=(10 << 20) + 1)
    assert str(info.value) == (
        f"--trainer.default_root_dir: {tmp_path / 'run'} has 10 MiB free but this run needs about 10 MiB for its "
        "checkpoints; free space or pass a folder on a larger disk."
    )
    assert list(tmp_path.iterdir()) == []  # refused runs leave no folder behind


def test_last_without_a_checkpoint_is_refused(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    with pytest.raises(ConfigError) as info:
        refuse_fresh_over_earlier(ckpt_dir, "last")
    assert str(info.value) == (
        f"--ckpt_path last: {ckpt_dir} holds no last.ckpt to resume; check --trainer.default_root_dir, or drop "
        "--ckpt_path to start afresh."
    )


def test_a_fresh_run_over_an_earlier_runs_checkpoint_is_refused(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / "best-epoch00-step4.ckpt").write_bytes(b"0")
    refuse_fresh_over_earlier(ckpt_dir, None)  # a best checkpoint alone is no resumable run
    (ckpt_dir / "last.ckpt").write_bytes(b"0")
    with pytest.raises(ConfigError) as info:
        refuse_fresh_over_earlier(ckpt_dir, None)
    assert str(info.value) == (
        f"--trainer.default_root_dir: {tmp_path} already holds an earlier run's checkpoint {ckpt_dir / 'last.ckpt'}; "
        "resume it with --ckpt_path last, or start afresh in another --trainer.default_root_dir."
    )
    refuse_fresh_over_earlier(ckpt_dir, "last")  # resuming is what it is for
    refuse_fresh_over_earlier(ckpt_dir, str(ckpt_dir / "last.ckpt"))  # so is an explicit path
    refuse_fresh_over_earlier(tmp_path / "other", None)  # a fresh folder


def fake_trainer(dirpath, *, world_size=1, vote=None, step=7, epoch=1):
    strategy = SimpleNamespace(reduce_boolean_decision=vote)
    callback = SimpleNamespace(dirpath=str(dirpath))
    return SimpleNamespace(
        world_size=world_size, strategy=strategy, checkpoint_callbacks=[callback], global_step=step, current_epoch=epoch
    )


def test_finite_loss_passes_a_finite_loss(tmp_path):
    assert FiniteLoss().on_before_backward(fake_trainer(tmp_path), None, torch.tensor(2.5)) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_stops_naming_the_step_and_the_fix(value, tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        FiniteLoss().on_before_backward(fake_trainer(tmp_path), None, torch.tensor(value))
    assert isinstance(info.value, UserError) and isinstance(info.value, FloatingPointError)
    assert str(info.value) == (
        f"training loss is {value} at step 7 (epoch 1); the run stopped before that update and no checkpoint had "
        "been written yet. Lower --model.init_args.optimizer.init_args.lr or use --trainer.precision bf16-mixed "
        "rather than 16-mixed, then resume with --ckpt_path last."
    )


def test_non_finite_loss_names_the_last_good_checkpoint(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"0")
    loss = torch.tensor([1.0, float("nan")])  # not a scalar: no value to print
    with pytest.raises(NonFiniteLossError) as info:
        FiniteLoss().on_before_backward(fake_trainer(tmp_path, step=3, epoch=0), None, loss)
    message = str(info.value)
    assert message.startswith("training loss is not finite at step 3 (epoch 0);")
    assert f"the last good checkpoint is {tmp_path / 'last.ckpt'}." in message and "\n" not in message


def test_every_rank_votes_on_a_non_finite_loss(tmp_path):
    votes = []

    def another_rank_saw_nan(bad, all):
        votes.append((bad, all))
        return True

    trainer = fake_trainer(tmp_path, world_size=2, vote=another_rank_saw_nan)
    with pytest.raises(NonFiniteLossError):  # this rank's loss is finite, but it stops with the others
        FiniteLoss().on_before_backward(trainer, None, torch.tensor(1.0))
    assert votes == [(False, False)]  # any rank (all=False) suffices
    trainer.strategy.reduce_boolean_decision = lambda bad, all: False
    FiniteLoss().on_before_backward(trainer, None, torch.tensor(1.0))
