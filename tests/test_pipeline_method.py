"""The method benchmark's pipeline paths: a baseline trained to a plateau, VITask on the same step budget, the
incomplete-instruction experiment as the paper ran it, the probe ceilings and paired differences in the report."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from vitask_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _avg(path: str) -> dict:
    return json.loads(Path(path).read_text())["wo_ep"]["score"]["avg"]


@pytest.mark.slow
def test_method_pipeline_matches_steps_trains_incomplete_and_reports_probes_and_pairs(
    tmp_path, synth_root, tiny_dirs, feature_cache_dir
):
    import yaml

    stop = [
        {
            "class_path": "lightning.pytorch.callbacks.EarlyStopping",
            "init_args": {"monitor": "val/avg/acc", "mode": "max", "patience": 1},
        }
    ]
    cache = {"model.init_args.exemplar.cache_dir": feature_cache_dir, "trainer.limit_val_batches": 0}
    config = {
        "name": "m",
        "configs": str(ROOT / "configs"),
        "overlay": "offline",
        "synthesize": None,
        "vlm": tiny_dirs["internvl"],
        "common": {
            "data.root": str(synth_root),
            "data.datasets": ["dermamnist", "pneumoniamnist"],
            "data.max_samples": 8,
            "data.batch_size": 4,
            "data.num_workers": 0,
            "trainer.max_epochs": 1,
            "trainer.enable_progress_bar": False,
        },
        "stages": {
            "tsm": {"model.init_args.backbone": "resnet18"},
            "vanilla": {
                "trainer.max_epochs": 6,
                "trainer.callbacks": stop,
                "model.init_args.evaluation.test_protocols": ["score"],
            },
            "ep": cache,
            "rda_crt": cache,
        },
        "incomplete": True,
        "match_vanilla_steps": True,
        "probes": True,
        "seeds": 2,
        "select_on_val": ["tsm", "vanilla", "vanilla_incomplete"],
        "jobs": 2,
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    main(["pipeline", "--config", str(tmp_path / "m.yaml"), "--runs_root", str(tmp_path)])

    run = tmp_path / "m"
    # Two workers ran the stages side by side; seed 1 again in this process, in order, gives the same numbers.
    metrics = {p: p.read_bytes() for p in (run / "seed1").rglob("metrics.json")}
    probes = (run / "seed1" / "probe" / "probes.json").read_text()
    shutil.rmtree(run / "seed1")
    main(["pipeline", "--config", str(tmp_path / "m.yaml"), "--runs_root", str(tmp_path), "--jobs", "1"])
    assert sorted(metrics) == sorted((run / "seed1").rglob("metrics.json")) and len(metrics) >= 9
    assert all(path.read_bytes() == text for path, text in metrics.items())
    strip = lambda text: {k: v for k, v in json.loads(text).items() if k != "wall_time_s"}  # noqa: E731
    assert strip((run / "seed1" / "probe" / "probes.json").read_text()) == strip(probes)
    results = json.loads((run / "results.json").read_text())
    for seed in ("seed0", "seed1"):
        rec = {
            s: json.loads((run / seed / s / "done.json").read_text())
            for s in ("vanilla", "ep", "rda_crt", "vanilla_incomplete", "ep_incomplete", "rda_crt_incomplete")
        }
        # VITask's two stages share the baseline's steps (to its best validation checkpoint) half and half.
        for base, one, two in (
            ("vanilla", "ep", "rda_crt"),
            ("vanilla_incomplete", "ep_incomplete", "rda_crt_incomplete"),
        ):
            total = rec[base]["steps"]
            assert "best-epoch" in rec[base]["checkpoint"] and total > 0
            assert rec[one]["steps"] == max(1, total // 2) and rec[two]["steps"] == max(1, total - total // 2)
        # Trained incomplete: the saved config of the fit says so, and the row reads those metrics.
        fitted = yaml.safe_load((Path(rec["rda_crt_incomplete"]["metrics"]).parent / "config.yaml").read_text())
        assert fitted["data"]["init_args"]["incomplete_instruction"] is True
        probes = json.loads((run / seed / "probe" / "probes.json").read_text())
        assert set(probes["features"]) == {"dermamnist", "pneumoniamnist", "avg"}
        assert 0.0 <= probes["pixels"]["avg"]["acc"] <= 1.0
    # Paired differences are per seed, row minus its own baseline, recomputed here from the metrics files.
    for row, stage, base in (
        ("VITask w/o EP", "rda_crt", "vanilla"),
        ("VITask w/o EP, trained and tested incomplete", "rda_crt_incomplete", "vanilla_incomplete"),
    ):
        expected = []
        for seed in ("seed0", "seed1"):
            a = json.loads((run / seed / stage / "done.json").read_text())["metrics"]
            b = json.loads((run / seed / base / "done.json").read_text())["metrics"]
            expected.append(_avg(a)["acc"] - _avg(b)["acc"])
        got = results["paired"][row]["acc"]["values"]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected))
    report = (run / "report.md").read_text()
    assert "Probe ceiling: VLM frozen image features" in report and "Paired differences" in report
    assert "Is the testbed valid?" in report and "× the ceiling" in report
    # Beside the baseline, the vanilla trained without the label list, per dataset, as in the results.
    unlisted = results["rows"]["Vanilla IT, trained and tested incomplete"]["dermamnist"]["acc"]["mean"]
    table = [
        line.split(" | ")
        for line in report[report.index("Is the testbed valid?") :].splitlines()
        if line.startswith("| ")
    ]
    column = table[0].index("Vanilla IT, trained and tested incomplete")
    derma = next(row for row in table if row[0] == "| derma")
    assert derma[column].startswith(f"{unlisted:.3f}")
