"""VITask^plug end to end on an imported external set (the paper's Table 3), through the README's commands.

RetinaMNIST-format data stands in for MedMNIST; its test images, written out as APTOS ships its data (a CSV of
``id_code,diagnosis`` and a folder of PNGs of another size), are imported as ``aptos`` sharing retinamnist's
label space. A stage-2 model tuned on retinamnist is then scored on aptos without the TSM, with the original TSM
and with a TSM trained on aptos plugged in; none of them re-tunes the VLM or the connector.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from vitask_pl.data.synth import synthesize

from .conftest import run, stage_configs

pytestmark = pytest.mark.slow
QUICK = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--data.batch_size", "4"]
QUICK += ["--data.max_samples", "12", "--data.num_workers", "0", "--trainer.enable_progress_bar", "false"]


def _aptos_layout(npz_file, out):
    from PIL import Image

    (out / "train_images").mkdir(parents=True)
    with np.load(npz_file) as npz, open(out / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id_code", "diagnosis"])
        for split in ("train", "val", "test"):
            for i, (image, label) in enumerate(zip(npz[f"{split}_images"], npz[f"{split}_labels"][:, 0])):
                Image.fromarray(image).resize((40, 30)).save(out / "train_images" / f"{split}{i}.png")
                writer.writerow([f"{split}{i}", int(label)])


def _predictions(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_vitask_plug_on_an_imported_aptos_set(tmp_path, capsys, feature_cache_dir):
    data, runs = tmp_path / "data", tmp_path / "runs"
    synthesize(data, ["retinamnist"], per_class=8)
    _aptos_layout(data / "retinamnist.npz", tmp_path / "aptos")
    code, _, err = run(
        [
            "data",
            "import",
            "--source",
            str(tmp_path / "aptos/train.csv"),
            "--image_dir",
            str(tmp_path / "aptos/train_images"),
            "--path_column",
            "id_code",
            "--label_column",
            "diagnosis",
            "--suffix",
            ".png",
            "--name",
            "aptos",
            "--shares",
            "retinamnist",
            "--root",
            str(data),
        ],
        capsys,
    )
    assert code == 0, err
    assert run(["data", "check", "--root", str(data), "--datasets", "[aptos]"], capsys)[0] == 0

    def fit(stage, name, datasets, *extra):
        argv = ["fit", *stage_configs(stage), "--data.root", str(data), "--data.datasets", datasets, *QUICK]
        argv += ["--trainer.default_root_dir", str(runs / name), *extra]
        code, _, err = run(argv, capsys)
        assert code == 0, err
        return str(runs / name / "checkpoints" / "last.ckpt")

    vlm = ["--model.init_args.vlm", "tiny:internvl", "--model.init_args.exemplar.cache_dir", str(feature_cache_dir)]
    tsm = fit("tsm", "tsm", "[retinamnist]", "--model.init_args.backbone", "resnet18")
    plug = fit("tsm", "tsm_plug", "[aptos]", "--model.init_args.backbone", "resnet18")
    stage1 = fit("ep", "ep", "[retinamnist]", *vlm, "--model.init_args.tsm_ckpt", tsm)
    stage2 = fit(
        "rda_crt",
        "rda_crt",
        "[retinamnist]",
        *vlm,
        "--model.init_args.tsm_ckpt",
        tsm,
        "--model.init_args.init_from",
        stage1,
    )

    results, predictions = {}, {}
    for name, teacher in (("original", tsm), ("plugged", plug)):
        where = ["--data.root", str(data), "--data.datasets", "[aptos]", "--data.num_workers", "0"]
        where += [*vlm, "--model.init_args.tsm_ckpt", teacher, "--ckpt_path", stage2]
        for command in ("test", "predict"):
            out = runs / f"{command}_{name}"
            code, _, err = run(
                [command, *stage_configs("rda_crt"), *where, "--trainer.default_root_dir", str(out)], capsys
            )
            assert code == 0, err
        results[name] = json.loads(next((runs / f"test_{name}").rglob("metrics.json")).read_text())
        predictions[name] = _predictions(next((runs / f"predict_{name}").rglob("predictions.csv")))
    for name in results:
        assert set(results[name]["wo_ep"]["score"]) == {"aptos", "avg"}
        assert set(results[name]["w_ep"]["score"]) == {"aptos", "avg"}
    # Without the TSM the two runs are the same model on the same images; with it, the plugged TSM's features
    # (not the original's) reach the same, un-retuned connector.
    assert results["original"]["wo_ep"] == results["plugged"]["wo_ep"]

    def probs(rows, mode):
        return [[v for k, v in r.items() if k.startswith("p[")] for r in rows if r["mode"] == mode]

    original, plugged = predictions["original"], predictions["plugged"]
    assert probs(original, "wo_ep") and probs(original, "w_ep")
    assert probs(original, "wo_ep") == probs(plugged, "wo_ep")
    assert probs(original, "w_ep") != probs(plugged, "w_ep")


def test_the_pipeline_runs_vitask_plug_and_reports_table_3(tmp_path, capsys, feature_cache_dir):
    import yaml

    from vitask_pl.cli import main
    from vitask_pl.data.importer import import_dataset

    from .conftest import ROOT

    data = tmp_path / "data"
    synthesize(data, ["retinamnist"], per_class=8)
    _aptos_layout(data / "retinamnist.npz", tmp_path / "aptos")
    import_dataset(
        str(tmp_path / "aptos/train.csv"),
        "aptos",
        root=str(data),
        shares="retinamnist",
        image_dir=str(tmp_path / "aptos/train_images"),
        path_column="id_code",
        label_column="diagnosis",
        suffix=".png",
    )
    cache = {"model.init_args.exemplar.cache_dir": feature_cache_dir}
    config = {
        "name": "p",
        "configs": str(ROOT / "configs"),
        "vlm": "tiny:internvl",
        "common": {
            "data.root": str(data),
            "data.datasets": ["retinamnist"],
            "data.max_samples": 8,
            "data.batch_size": 4,
            "data.num_workers": 0,
            "trainer.max_steps": 2,
            "trainer.limit_val_batches": 0,
            "trainer.enable_progress_bar": False,
        },
        "stages": {"tsm": {"model.init_args.backbone": "resnet18"}, "ep": cache, "rda_crt": cache},
        "probes": False,
        "plug": ["aptos"],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    main(["pipeline", "--config", str(tmp_path / "p.yaml"), "--runs_root", str(tmp_path)])

    run = tmp_path / "p"
    tsm = json.loads((run / "seed0/plug_tsm_aptos/done.json").read_text())
    assert json.loads(open(tsm["metrics"]).read())["aptos"]  # the plugged TSM, trained and tested on aptos
    record = json.loads((run / "seed0/plug_aptos/done.json").read_text())
    original, plugged = (json.loads(open(record[k]).read()) for k in ("metrics", "metrics_plugged"))
    assert original["wo_ep"] == plugged["wo_ep"]  # the VLM alone does not see the TSM
    assert set(original["w_ep"]["score"]) == {"aptos", "avg"}
    rows = json.loads((run / "results.json").read_text())["plug"]["aptos"]
    assert list(rows) == [
        "Vanilla IT",
        "VITask w/o EP",
        "VITask w/ EP, original TSM",
        "VITask^plug: w/ EP, TSM trained on it",
        "TSM trained on it",
    ]
    assert rows["VITask w/o EP"]["acc"]["mean"] == original["wo_ep"]["score"]["aptos"]["acc"]
    assert rows["VITask^plug: w/ EP, TSM trained on it"]["acc"]["mean"] == plugged["w_ep"]["score"]["aptos"]["acc"]
    report = (run / "report.md").read_text()
    assert "## External validation: VITask^plug (the paper's Table 3)" in report and "**aptos**" in report
    # A second run finds every stage done and skips it.
    main(["pipeline", "--config", str(tmp_path / "p.yaml"), "--runs_root", str(tmp_path)])
    assert "plug_aptos: done earlier, skipped" in capsys.readouterr().out
