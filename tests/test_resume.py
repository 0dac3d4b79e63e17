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
import tempfile
import time
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, stage_configs

STEPS_PER_EPOCH = 5  # 2 datasets x max_samples 10 / batch 4
EPOCHS = 2
EVERY = 3  # last.ckpt at steps 3, 6, 9: all mid-epoch (none is a multiple of 5)


def _env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }


def stage_args(stage: str, root: Path, synth_root, tiny_dirs, tsm_ckpt, feature_cache_dir, init_from=None) -> list[str]:
    config = {"tsm": "tsm", "vanilla": "vanilla", "ep": "ep", "rda_crt": "rda_crt"}[stage]
    args = [
        "fit",
        *stage_configs(config),
        "--data.root",
        str(synth_root),
        "--data.datasets",
        "[dermamnist,pneumoniamnist]",
        "--data.max_samples",
        "10",
        "--data.batch_size",
        "4",
        "--seed_everything",
        "7",
        "--trainer.max_epochs",
        str(EPOCHS),
        "--trainer.limit_val_batches",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.default_root_dir",
        str(root),
        "--last_checkpoint.every_n_train_steps",
        str(EVERY),
    ]
    if stage == "tsm":  # augmentation drawn in 2 worker processes
        return args + ["--model.init_args.backbone", "resnet18", "--data.augment_shift", "2", "--data.num_workers", "2"]
    args += [
        "--model.init_args.vlm",
        tiny_dirs["internvl"],
        "--model.init_args.lora.dropout",
        "0.2",
        "--data.num_workers",
        "0",
        "--data.eval_batch_size",
        "8",
    ]
    if stage in ("ep", "rda_crt"):
        args += ["--model.init_args.tsm_ckpt", tsm_ckpt, "--model.init_args.exemplar.cache_dir", feature_cache_dir]
    if stage == "rda_crt":
        args += ["--model.init_args.init_from", init_from]
    return args


def start(args: list[str], command: str = "vitask_pl.cli") -> subprocess.Popen:
    """``python -m command ARGS`` in the background; output to a temporary file, so a full pipe never stalls it."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", command, *args], env=_env(), cwd=ROOT, text=True, stdout=log, stderr=subprocess.STDOUT
    )
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, output(proc)[-3000:]
    return output(proc)


def vitask(args: list[str], timeout: float = 600) -> str:
    return finish(start(args), timeout)


def kill_at_first_checkpoint(args: list[str], last: Path, timeout: float = 600) -> None:
    """Start ``vitask ARGS`` and SIGKILL it the moment ``last`` (a complete file: writes are atomic) appears."""
    proc = start(args)
    begin = time.monotonic()
    while not last.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its first checkpoint: {output(proc)[-3000:]}")
        assert time.monotonic() - begin < timeout, "no checkpoint appeared"
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


def kill_and_resume(args, tmp_path) -> tuple[dict, dict, int]:
    """Run ``args`` straight and, beside it, a twin killed at its first checkpoint then resumed; both end states
    and the step the twin was killed at."""
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    straight = start(args("straight"))  # runs beside the one to be killed: two cores, one thread each
    kill_at_first_checkpoint(args("crashed"), last)
    finish(straight)
    killed_at = state(last)["global_step"]
    resumed = vitask([*args("crashed"), "--ckpt_path", "last"])
    assert "Restoring states from the checkpoint" in resumed
    return state(tmp_path / "straight" / "checkpoints" / "last.ckpt"), state(last), killed_at


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["tsm", "vanilla", "ep", "rda_crt"])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(
    stage, tmp_path, synth_root, tiny_dirs, tsm_ckpt, feature_cache_dir, request
):
    init_from = request.getfixturevalue("stage1_ckpt") if stage == "rda_crt" else None

    def args(name: str) -> list[str]:
        return stage_args(stage, tmp_path / name, synth_root, tiny_dirs, tsm_ckpt, feature_cache_dir, init_from)

    straight, resumed, killed_at = kill_and_resume(args, tmp_path)
    assert 0 < killed_at < STEPS_PER_EPOCH * EPOCHS and killed_at % STEPS_PER_EPOCH != 0  # mid-epoch
    assert_identical(straight, resumed)


@pytest.mark.slow
def test_killed_at_an_epoch_end_with_an_injected_schedule_resumes_exactly(
    tmp_path, synth_root, tiny_dirs, tsm_ckpt, feature_cache_dir
):
    """A checkpoint on an epoch's last batch (the save waits for that epoch's validation), and a scheduler given in
    the config, with which Lightning itself applies the loader state: the same weights, and the same validations
    (so the same best checkpoint) as a run that never stopped."""

    def args(name: str) -> list[str]:
        return [
            *stage_args("tsm", tmp_path / name, synth_root, tiny_dirs, tsm_ckpt, feature_cache_dir),
            "--last_checkpoint.every_n_train_steps",
            str(STEPS_PER_EPOCH),
            "--model.init_args.scheduler",
            "torch.optim.lr_scheduler.ExponentialLR",
            "--model.init_args.scheduler.gamma",
            "0.5",
        ]

    straight, resumed, killed_at = kill_and_resume(args, tmp_path)
    assert killed_at == STEPS_PER_EPOCH
    assert_identical(straight, resumed)
    best = [sorted(p.name for p in (tmp_path / run / "checkpoints").glob("best-*")) for run in ("straight", "crashed")]
    assert best[0] == best[1] and best[0]


@pytest.mark.slow
def test_pipeline_killed_mid_stage_continues_where_it_stopped(tmp_path, synth_root, tiny_dirs, feature_cache_dir):
    """``vitask pipeline`` killed during stage 1's fit, run again: finished stages are skipped, stage 1 resumes
    from its last.ckpt, and every checkpoint and metric equals an uninterrupted pipeline's."""
    import json

    import yaml

    vlm = {"model.init_args.vlm": tiny_dirs["internvl"]}
    cache = {**vlm, "model.init_args.exemplar.cache_dir": feature_cache_dir}
    config = {
        "name": "p",
        "configs": str(ROOT / "configs"),
        "overlay": "offline",
        "synthesize": None,
        "common": {
            "data.root": str(synth_root),
            "data.datasets": ["dermamnist", "pneumoniamnist"],
            "data.max_samples": 10,
            "data.batch_size": 4,
            "data.eval_batch_size": 10,
            "data.num_workers": 0,
            "trainer.max_epochs": 1,
            "trainer.limit_val_batches": 1,
            "trainer.enable_progress_bar": False,
        },
        "stages": {
            "tsm": {"model.init_args.backbone": "resnet18"},
            "vanilla": vlm,
            "ep": {**cache, "trainer.max_epochs": 2, "last_checkpoint.every_n_train_steps": 3},
            "rda_crt": cache,
        },
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))

    def pipeline(name: str) -> list[str]:
        return ["pipeline", "--config", str(tmp_path / "p.yaml"), "--runs_root", str(tmp_path / name)]

    straight = start(pipeline("straight"))
    kill_at_first_checkpoint(pipeline("crashed"), tmp_path / "crashed/p/seed0/ep/checkpoints/last.ckpt")
    finish(straight, timeout=900)
    assert not (tmp_path / "crashed/p/seed0/ep/done.json").exists()

    log = vitask(pipeline("crashed"), timeout=900)
    assert "seed0/tsm: done earlier, skipped" in log and "seed0/vanilla: done earlier, skipped" in log
    assert "seed0/ep: fit, resuming from" in log
    for stage in ("ep", "rda_crt"):
        a, b = (state(tmp_path / f"{run}/p/seed0/{stage}/checkpoints/last.ckpt") for run in ("straight", "crashed"))
        assert a["global_step"] == b["global_step"] > 0
        assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items()), f"{stage} differs"
        metrics = [
            json.loads(
                Path(json.loads((tmp_path / f"{run}/p/seed0/{stage}/done.json").read_text())["metrics"]).read_text()
            )
            for run in ("straight", "crashed")
        ]
        assert metrics[0] == metrics[1]
