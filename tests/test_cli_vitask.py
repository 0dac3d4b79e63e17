"""The method's main commands end to end, offline: TSM checkpoint -> stage 1 -> stage 2 -> test and predict."""

import csv
import json

import pytest

from .conftest import run, stage_configs


@pytest.mark.slow
@pytest.mark.parametrize("family", ["internvl", "qwen2_vl"])
def test_ep_then_rda_crt_then_test_and_predict(family, tsm_ckpt, synth_root, feature_cache_dir, tmp_path, capsys):
    common = [
        "--model.init_args.tsm_ckpt",
        tsm_ckpt,
        "--model.init_args.vlm",
        f"tiny:{family}",
        "--model.init_args.exemplar.cache_dir",
        feature_cache_dir,
        "--data.root",
        str(synth_root),
        "--data.datasets",
        "[dermamnist,chestmnist,pneumoniamnist]",
        "--data.max_samples",
        "8",
        "--data.num_workers",
        "0",
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
    ]

    def stage(name, *extra):
        return [
            *stage_configs(name),
            *common,
            "--trainer.default_root_dir",
            str(tmp_path / name),
            *extra,
        ]

    code, _, err = run(["fit", *stage("ep")], capsys)
    assert code == 0, err
    stage1 = next((tmp_path / "ep").rglob("last.ckpt"))
    code, _, err = run(["fit", *stage("rda_crt", "--model.init_args.init_from", str(stage1))], capsys)
    assert code == 0, err
    stage2 = next((tmp_path / "rda_crt").rglob("last.ckpt"))
    assert stage2.stat().st_size < 2_000_000  # adapters only
    logged = (tmp_path / "rda_crt/lightning_logs/version_0/metrics.csv").read_text()
    assert all(f"train/{term}" in logged for term in ("l_van", "l_ep", "l_rda", "l_crt"))

    code, out, err = run(
        ["test", *stage("rda_crt", "--model.init_args.init_from", str(stage1)), "--ckpt_path", str(stage2)], capsys
    )
    assert code == 0, err
    metrics = json.loads(next((tmp_path / "rda_crt").rglob("metrics.json")).read_text())
    assert set(metrics) == {"wo_ep", "w_ep"}
    for mode in metrics.values():
        assert set(mode) == {"score", "generate"}
        assert {"acc", "f1", "auc"} <= set(mode["score"]["dermamnist"]) and "invalid" in mode["generate"]["avg"]
    assert "w_ep score" in out and "wo_ep generate" in out

    code, _, err = run(
        ["predict", *stage("rda_crt", "--model.init_args.init_from", str(stage1)), "--ckpt_path", str(stage2)], capsys
    )
    assert code == 0, err
    rows = list(csv.DictReader(open(next((tmp_path / "rda_crt").rglob("predictions.csv")))))
    assert len(rows) == 2 * 3 * 8 and {r["mode"] for r in rows} == {"wo_ep", "w_ep"}
    derma = next(r for r in rows if r["dataset"] == "dermamnist")
    probs = [float(v) for k, v in derma.items() if k.startswith("p[") and v]
    assert len(probs) == 7 and abs(sum(probs) - 1) < 1e-3


@pytest.mark.slow
def test_stage_errors_from_the_cli(tsm_ckpt, synth_root, tmp_path, capsys):
    base = [
        "--data.root",
        str(synth_root),
        "--data.datasets",
        "[dermamnist]",
        "--trainer.default_root_dir",
        str(tmp_path / "x"),
    ]
    code, _, err = run(
        [
            "fit",
            *stage_configs("rda_crt"),
            *base,
            "--model.init_args.tsm_ckpt",
            tsm_ckpt,
        ],
        capsys,
    )
    assert code == 2 and "init_from is required for stage 2" in err and "configs/ep.yaml" in err
    code, _, err = run(
        ["fit", *stage_configs("ep"), *base],
        capsys,
    )
    assert code == 2 and "tsm_ckpt is required for stage 1" in err and "configs/tsm.yaml" in err
    assert not (tmp_path / "x").exists()
