"""Pinned loss values of a short, seeded stage-1 -> stage-2 run on the CPU (torchtune's recipe-test idea).

A refactor that changes what a stage computes changes these numbers. The values were recorded on this code's CPU
path (fp32, one thread, tiny random InternVL, synthetic data); regenerate them only for a change that is meant to
alter the numbers, and say so in the commit. Driven through the CLI, so it pins the shipped configs too.
"""

import csv

import pytest

from ..conftest import run, stage_configs

# train/{loss, l_van, l_ep, l_rda, l_crt} at steps 1-4 of stage 2 (log_every_n_steps 1).
PINNED = {
    "loss": [7.700097, 7.815074, 9.981428, 10.044945],
    "l_van": [0.428208, 0.508907, 1.609830, 1.619436],
    "l_ep": [0.433821, 0.488782, 1.560645, 1.570192],
    "l_rda": [0.003790, 0.008882, 0.002708, 0.001977],
    "l_crt": [6.834280, 6.808504, 6.808244, 6.853340],
}


def _stage(name, tmp_path, common, *extra):
    return ["fit", *stage_configs(name), *common, "--trainer.default_root_dir", str(tmp_path / name), *extra]


def _logged(path) -> dict[str, list[float]]:
    rows = list(csv.DictReader(open(path)))
    return {k: [float(r[f"train/{k}"]) for r in rows if r.get(f"train/{k}")] for k in PINNED}


def test_stage2_losses_are_pinned(tsm_ckpt, synth_root, feature_cache_dir, tmp_path, capsys):
    options = {
        "model.init_args.tsm_ckpt": tsm_ckpt,
        "model.init_args.vlm": "tiny:internvl",
        "model.init_args.exemplar.cache_dir": feature_cache_dir,
        "data.root": str(synth_root),
        "data.datasets": "[dermamnist,pneumoniamnist]",
        "data.max_samples": "8",
        "data.batch_size": "4",
        "data.num_workers": "0",
        "trainer.max_steps": "4",
        "trainer.limit_val_batches": "0",
        "trainer.enable_progress_bar": "false",
        "trainer.log_every_n_steps": "1",
        "seed_everything": "0",
    }
    common = [arg for key, value in options.items() for arg in (f"--{key}", value)]
    code, _, err = run(_stage("ep", tmp_path, common), capsys)
    assert code == 0, err
    stage1 = tmp_path / "ep" / "checkpoints" / "last.ckpt"
    code, _, err = run(_stage("rda_crt", tmp_path, common, "--model.init_args.init_from", str(stage1)), capsys)
    assert code == 0, err
    logged = _logged(next((tmp_path / "rda_crt").rglob("metrics.csv")))
    for term, values in PINNED.items():
        # On another CPU (other SIMD kernels) the same run moved step 4's loss by 1.2e-4 relative (10.04376 vs
        # 10.04495) and l_rda, a small KL, by 5.3e-5 absolute (0.008935 vs 0.008882): hence rel 1e-3, abs 1e-4.
        # The KL direction, the detach and the CRT difference are pinned exactly by tests/test_losses.py.
        assert logged[term] == pytest.approx(values, rel=1e-3, abs=1e-4), term
