"""A run SIGKILLed mid-epoch and resumed with ``--ckpt_path last`` ends bit-identical to one that never stopped.

Every stage runs as a real ``vitask fit`` subprocess: once uninterrupted, once killed (``kill -9``) as soon as
its first mid-epoch ``last.ckpt`` lands, and once resumed from it. LoRA dropout and (TSM) augmentation with
worker processes are on, so the RNG, the sampler position and the worker seeding are all exercised.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .test_cli import ROOT

STEPS_PER_EPOCH = 5  # 2 datasets x max_samples 10 / batch 4
EPOCHS = 2
EVERY = 3  # last.ckpt at steps 3, 6, 9: all mid-epoch (none is a multiple of 5)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore"}  # fmt: skip


def stage_args(stage: str, root: Path, synth_root, tiny_dirs, tsm_ckpt, feature_cache_dir, init_from=None) -> list[str]:
    config = {"tsm": "tsm", "vanilla": "vanilla", "ep": "ep", "rda_crt": "rda_crt"}[stage]
    args = ["fit", "--config", str(ROOT / f"configs/{config}.yaml"), "--config", str(ROOT / f"configs/offline/{config}.yaml"),
            "--data.root", str(synth_root), "--data.datasets", "[dermamnist,pneumoniamnist]",
            "--data.max_samples", "10", "--data.batch_size", "4", "--seed_everything", "7",
            "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(root),
            "--last_checkpoint.every_n_train_steps", str(EVERY)]  # fmt: skip
    if stage == "tsm":  # augmentation drawn in 2 worker processes
        return args + ["--model.init_args.backbone", "resnet18", "--data.augment_shift", "2", "--data.num_workers", "2"]
    args += ["--model.init_args.vlm", tiny_dirs["internvl"], "--model.init_args.lora.dropout", "0.2",
             "--data.num_workers", "0", "--data.eval_batch_size", "8"]  # fmt: skip
    if stage in ("ep", "rda_crt"):
        args += ["--model.init_args.tsm_ckpt", tsm_ckpt, "--model.init_args.cache_dir", feature_cache_dir]
    if stage == "rda_crt":
        args += ["--model.init_args.init_from", init_from]
    return args


def vitask(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "vitask_pl.cli", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def kill_at_first_checkpoint(args: list[str], last: Path, timeout: float = 600) -> None:
    """Start ``vitask fit`` and SIGKILL it the moment ``last`` (a complete file: writes are atomic) appears."""
    proc = subprocess.Popen([sys.executable, "-m", "vitask_pl.cli", *args], env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    start = time.monotonic()
    while not last.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its first checkpoint: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() - start < timeout, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def assert_identical(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == STEPS_PER_EPOCH * EPOCHS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), f"{key} differs after resume"
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys() and opt_a
    for k in opt_a:
        for name in opt_a[k]:
            assert torch.equal(opt_a[k][name], opt_b[k][name]), f"optimizer {name} of param {k} differs after resume"


@pytest.fixture(scope="module")
def stage1_ckpt(tmp_path_factory, synth_root, tiny_dirs, tsm_ckpt, feature_cache_dir) -> str:
    root = tmp_path_factory.mktemp("stage1")
    args = stage_args("ep", root, synth_root, tiny_dirs, tsm_ckpt, feature_cache_dir)
    vitask([*args, "--trainer.max_epochs", "1"])
    return str(root / "checkpoints" / "last.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["tsm", "vanilla", "ep", "rda_crt"])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(stage, tmp_path, synth_root, tiny_dirs, tsm_ckpt,
                                                        feature_cache_dir, request):  # fmt: skip
    init_from = request.getfixturevalue("stage1_ckpt") if stage == "rda_crt" else None

    def args(name: str) -> list[str]:
        return stage_args(stage, tmp_path / name, synth_root, tiny_dirs, tsm_ckpt, feature_cache_dir, init_from)

    vitask(args("straight"))
    straight = state(tmp_path / "straight" / "checkpoints" / "last.ckpt")

    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    kill_at_first_checkpoint(args("crashed"), last)
    killed_at = state(last)["global_step"]
    assert 0 < killed_at < STEPS_PER_EPOCH * EPOCHS and killed_at % STEPS_PER_EPOCH != 0  # mid-epoch

    resumed = vitask([*args("crashed"), "--ckpt_path", "last"])
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout
    assert_identical(straight, state(last))
