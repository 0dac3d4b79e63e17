"""VITask^plug end to end on imported external sets (the paper's Table 3).

Through the README's commands: RetinaMNIST-format data stands in for MedMNIST; its images, written out as APTOS
ships its data (a CSV of ``id_code,diagnosis`` and a folder of PNGs of another size), are imported as ``aptos``
sharing retinamnist's label space. A stage-2 model tuned on retinamnist is then scored on aptos without the TSM,
with the original TSM and with a TSM trained on aptos plugged in; none of them re-tunes the VLM or the connector.
Through the pipeline's ``plug`` option: pydicom's own DICOM files as the external set, and `vitask classify` on
them agreeing with the report.
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


def test_the_pipeline_runs_vitask_plug_on_pydicom_files_and_classify_agrees(tmp_path, capsys, feature_cache_dir):
    """pydicom's own CT and MR files (raw and RLE), imported as a set graded like pneumoniamnist (CT 0, MR 1: a
    mechanical stand-in for an external set), through the pipeline's plug option; then `vitask classify` on the
    original DICOM files of its test split, with the plugged TSM, gives the report's numbers."""
    import shutil

    import yaml

    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from vitask_pl.cli import main
    from vitask_pl.data.importer import import_dataset

    from .conftest import ROOT

    data, tree = tmp_path / "data", tmp_path / "scans"
    synthesize(data, ["pneumoniamnist"], per_class=8)
    for label, names in {"0": ["CT_small.dcm"], "1": ["MR_small.dcm", "MR_small_RLE.dcm"]}.items():
        (tree / label).mkdir(parents=True)
        for i in range(10):
            shutil.copy(get_testdata_file(names[i % len(names)]), tree / label / f"{i}.dcm")
    import_dataset(str(tree), "scans", root=str(data), shares="pneumoniamnist")
    cache = {"model.init_args.exemplar.cache_dir": feature_cache_dir}
    config = {
        "name": "p",
        "configs": str(ROOT / "configs"),
        "vlm": "tiny:internvl",
        "common": {
            "data.root": str(data),
            "data.datasets": ["pneumoniamnist"],
            "data.max_samples": 8,
            "data.batch_size": 4,
            "data.num_workers": 0,
            "trainer.max_steps": 2,
            "trainer.limit_val_batches": 0,
            "trainer.enable_progress_bar": False,
        },
        "stages": {"tsm": {"model.init_args.backbone": "resnet18"}, "ep": cache, "rda_crt": cache},
        "probes": False,
        "plug": ["scans"],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    main(["pipeline", "--config", str(tmp_path / "p.yaml"), "--runs_root", str(tmp_path)])

    run_dir = tmp_path / "p"
    tsm = json.loads((run_dir / "seed0/plug_tsm_scans/done.json").read_text())
    card = json.loads((data / "scans.card.json").read_text())
    tested = json.loads(open(tsm["metrics"]).read())["scans"]  # the plugged TSM, trained and tested on the scans
    assert tested["n"] == card["n_samples"]["test"] and 0 <= tested["acc"] <= 1
    record = json.loads((run_dir / "seed0/plug_scans/done.json").read_text())
    original, plugged = (json.loads(open(record[k]).read()) for k in ("metrics", "metrics_plugged"))
    assert original["wo_ep"] == plugged["wo_ep"]  # the VLM alone does not see the TSM
    assert set(original["w_ep"]["score"]) == {"scans", "avg"}
    rows = json.loads((run_dir / "results.json").read_text())["plug"]["scans"]
    assert list(rows) == [
        "Vanilla IT",
        "VITask w/o EP",
        "VITask w/ EP, original TSM",
        "VITask^plug: w/ EP, TSM trained on it",
        "TSM trained on it",
    ]
    assert rows["VITask w/o EP"]["acc"]["mean"] == original["wo_ep"]["score"]["scans"]["acc"]
    assert rows["VITask^plug: w/ EP, TSM trained on it"]["acc"]["mean"] == plugged["w_ep"]["score"]["scans"]["acc"]
    report = (run_dir / "report.md").read_text()
    assert "## External validation: VITask^plug (the paper's Table 3)" in report and "**scans**" in report

    # The DICOM files of the test split (all of them: the split is smaller than max_samples), classified.
    with open(data / "scans.files.csv") as f:
        test_files = [m for m in csv.DictReader(f) if m["split"] == "test"]
    assert 0 < len(test_files) <= 8
    images = f"[{','.join(m['path'] for m in test_files)}]"
    out = tmp_path / "scans.csv"
    stage2 = json.loads((run_dir / "seed0/rda_crt/done.json").read_text())["checkpoint"]
    argv = ["classify", "--model", stage2, "--dataset", "scans", "--root", str(data), "--images", images]
    code, _, err = run([*argv, "--tsm_ckpt", tsm["checkpoint"], "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    classified = _predictions(out)
    for mode, metrics in (("wo_ep", original), ("w_ep", plugged)):
        acc = np.mean([r[f"{mode}_answer"] == m["label"] for r, m in zip(classified, test_files)])
        assert acc == pytest.approx(metrics[mode]["score"]["scans"]["acc"], abs=1e-6)
    # A second run finds every stage done and skips it.
    main(["pipeline", "--config", str(tmp_path / "p.yaml"), "--runs_root", str(tmp_path)])
    assert "plug_scans: done earlier, skipped" in capsys.readouterr().out
