"""`vitask classify`: image files through a tuned stage, from its checkpoint or its export, give the probabilities
`vitask predict` gives on the same test split, with and without the exemplar; bad inputs are one line and
overwrite nothing."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from vitask_pl.classify import Classifier
from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.errors import ConfigError, MissingFileError
from vitask_pl.export import export
from vitask_pl.modules.vanilla import VanillaInstructionTuning
from vitask_pl.modules.vitask import ExemplarPromptTuning, RDACRTTuning

from .conftest import make_tsm_ckpt, quick_trainer, run
from .test_export import FLAGS, LORA, fit_and_save, sharp_base

TOL = 2e-6  # predictions.csv rounds to 6 decimals


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def write_split_images(root, flag: str, out, size: int = 28):
    """The test split of ``flag`` as PNG files named by row, so a folder's sorted order is the split's."""
    from PIL import Image

    out.mkdir(parents=True)
    with np.load(root / f"{flag}.npz") as npz:
        for i, image in enumerate(npz["test_images"]):
            Image.fromarray(image).save(out / f"{i:03d}.png")
    return out


def by_index(rows: list[dict], flag: str, mode: str) -> dict[int, list[float]]:
    """predictions.csv's class probabilities of one dataset and mode, by test-split row."""
    return {
        int(r["index"]): [float(v) for k, v in r.items() if k.startswith("p[") and v != ""]
        for r in rows
        if r["dataset"] == flag and r["mode"] == mode
    }


def probs(rows: list[dict], mode: str) -> np.ndarray:
    return np.array([list(r[mode]["probs"].values()) for r in rows])


@pytest.fixture(scope="module")
def stages(tiny_dirs, tsm_ckpt, synth_root, feature_cache_dir, tmp_path_factory):
    """``{stage: (checkpoint, predictions.csv rows)}`` of a sharp tiny InternVL (its outputs depend on the image and
    on the exemplar) tuned as each VLM stage. The rows are the stage's predict loop (what `vitask predict` runs)
    on the test splits, the reference; its exemplar features come from the feature cache, while classify runs
    the TSM on the files."""
    root = tmp_path_factory.mktemp("classify")
    base = sharp_base(tiny_dirs["internvl"], root / "base")
    common = dict(vlm=base, datasets=FLAGS, lora=LORA, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    vitask = dict(tsm_ckpt=tsm_ckpt, exemplar={"cache_dir": feature_cache_dir}, **common)
    out = {}
    for name, build in (
        ("ep", lambda: ExemplarPromptTuning(**vitask)),
        ("rda_crt", lambda: RDACRTTuning(init_from=out["ep"][0], **vitask)),
        ("vanilla", lambda: VanillaInstructionTuning(**common)),
    ):
        module = build()
        path = fit_and_save(module, synth_root, root / name)
        dm = MedMNISTDataModule(synth_root, FLAGS, 28, batch_size=4, num_workers=0)
        quick_trainer(1, default_root_dir=root / name / "predict").predict(module.eval(), datamodule=dm)
        out[name] = (path, read_csv(root / name / "predict" / "predictions.csv"))
    return out


@pytest.fixture(scope="module")
def stage(stages):
    return stages["ep"]


@pytest.mark.parametrize("name", ["ep", "rda_crt", "vanilla"])
@pytest.mark.parametrize("flag", FLAGS)  # RGB multi-class, gray multi-label
def test_classify_files_equals_predict_on_the_split(name, flag, stages, synth_root, tmp_path):
    path, predicted = stages[name]
    images = write_split_images(synth_root, flag, tmp_path / "images")
    clf = Classifier.load(path, flag, device="cpu")
    assert clf.modes == (("wo_ep",) if name == "vanilla" else ("wo_ep", "w_ep"))
    rows = clf.predict(images)  # a folder, read in sorted order
    assert [r["image"] for r in rows] == [str(p) for p in sorted(images.iterdir())]
    for mode in clf.modes:
        reference = by_index(predicted, flag, mode)
        assert len(reference) == len(rows) > 0
        np.testing.assert_allclose(probs(rows, mode), [reference[i] for i in range(len(rows))], atol=TOL, rtol=0)
    if name != "vanilla":
        assert not np.allclose(probs(rows, "wo_ep"), probs(rows, "w_ep"), atol=1e-2)  # the exemplar reaches them
    # Arrays and PIL images in, as a notebook has them: the same rows.
    from PIL import Image

    with np.load(synth_root / f"{flag}.npz") as npz:
        arrays = list(npz["test_images"][:3])
    mode = clf.modes[-1]  # to 1e-5: a batch of 3 against one of 16 sums floats in another order
    np.testing.assert_allclose(probs(clf.predict(arrays), mode), probs(rows[:3], mode), atol=1e-5, rtol=0)
    pictures = [Image.fromarray(a) for a in arrays]
    np.testing.assert_allclose(probs(clf.predict(pictures), mode), probs(rows[:3], mode), atol=1e-5, rtol=0)


def test_an_export_classifies_as_its_checkpoint_and_carries_its_tsm(stage, synth_root, tmp_path):
    images = write_split_images(synth_root, FLAGS[0], tmp_path / "images")
    folder = export(stage[0], out=str(tmp_path / "export"))
    assert (folder / "tsm.ckpt").is_file()
    ours = Classifier.load(stage[0], FLAGS[0], device="cpu").predict(images)
    theirs = Classifier.load(folder, FLAGS[0], device="cpu").predict(images)
    for mode in ("wo_ep", "w_ep"):
        np.testing.assert_allclose(probs(theirs, mode), probs(ours, mode), atol=1e-6, rtol=0)
    # A stage whose TSM has gone: the export says so and holds none, and classifying with the exemplar asks for one.
    checkpoint = torch.load(stage[0], weights_only=True)
    tsm = checkpoint["hyper_parameters"]["tsm_ckpt"]
    checkpoint["hyper_parameters"]["tsm_ckpt"] = str(tmp_path / "gone.ckpt")
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    bare = export(str(tmp_path / "moved.ckpt"), out=str(tmp_path / "bare"))
    assert not (bare / "tsm.ckpt").exists()
    with pytest.raises(MissingFileError, match=r"--tsm_ckpt: the stage's TSM \(none recorded\) is not there"):
        Classifier.load(bare, FLAGS[0], device="cpu")
    plugged = Classifier.load(bare, FLAGS[0], tsm_ckpt=tsm, device="cpu").predict(images)
    np.testing.assert_allclose(probs(plugged, "w_ep"), probs(ours, "w_ep"), atol=1e-6, rtol=0)


def test_plugging_another_tsm_changes_only_the_exemplar_answers(stage, synth_root, tmp_path):
    images = write_split_images(synth_root, FLAGS[0], tmp_path / "images")
    other = make_tsm_ckpt(synth_root, [FLAGS[0]], tmp_path / "other.ckpt", seed=3)
    original = Classifier.load(stage[0], FLAGS[0], device="cpu").predict(images)
    plugged = Classifier.load(stage[0], FLAGS[0], tsm_ckpt=other, device="cpu").predict(images)
    np.testing.assert_array_equal(probs(plugged, "wo_ep"), probs(original, "wo_ep"))
    assert not np.allclose(probs(plugged, "w_ep"), probs(original, "w_ep"), atol=1e-3)
    alone = Classifier.load(stage[0], FLAGS[0], ep=False, device="cpu")
    assert alone.modes == ("wo_ep",)
    np.testing.assert_array_equal(probs(alone.predict(images), "wo_ep"), probs(original, "wo_ep"))


def test_the_readme_plug_command_on_an_export(stage, synth_root, tmp_path, capsys):
    """`vitask classify --model EXPORT --tsm_ckpt OTHER` (README, "Classify image files") is the plugged classifier."""
    images = write_split_images(synth_root, FLAGS[0], tmp_path / "images")
    other = make_tsm_ckpt(synth_root, [FLAGS[0]], tmp_path / "other.ckpt", seed=3)
    folder = export(stage[0], out=str(tmp_path / "export"))
    argv = ["classify", "--model", str(folder), "--dataset", FLAGS[0], "--images", f"[{images}]"]
    code, _, err = run([*argv, "--tsm_ckpt", other, "--out", str(tmp_path / "plugged.json")], capsys)
    assert code == 0, err
    plugged = Classifier.load(stage[0], FLAGS[0], tsm_ckpt=other, device="cpu").predict(images)
    ours = json.loads((tmp_path / "plugged.json").read_text())
    np.testing.assert_allclose(probs(ours, "w_ep"), probs(plugged, "w_ep"), atol=1e-6, rtol=0)


def test_the_command_writes_csv_and_json_and_never_overwrites(stage, synth_root, tmp_path, capsys):
    images = write_split_images(synth_root, FLAGS[0], tmp_path / "images")
    argv = ["classify", "--model", stage[0], "--dataset", FLAGS[0], "--images", f"[{images}]", "--device", "cpu"]
    code, out, err = run([*argv, "--out", str(tmp_path / "p.csv")], capsys)
    assert code == 0, err
    assert f"classify: {len(list(images.iterdir()))} images of {FLAGS[0]} (wo_ep, w_ep)" in out
    rows = read_csv(tmp_path / "p.csv")
    spec = Classifier.load(stage[0], FLAGS[0], device="cpu").spec
    assert list(rows[0]) == ["image", "dataset"] + [
        c for m in ("wo_ep", "w_ep") for c in [f"{m}_answer", *(f"{m}_p[{label}]" for label in spec.labels)]
    ]
    for row in rows:  # the answer is the most probable class
        p = [float(row[f"wo_ep_p[{label}]"]) for label in spec.labels]
        assert row["wo_ep_answer"] == spec.labels[int(np.argmax(p))]
    assert run([*argv, "--out", str(tmp_path / "p.json")], capsys)[0] == 0
    loaded = json.loads((tmp_path / "p.json").read_text())
    assert [r["image"] for r in loaded] == [r["image"] for r in rows]
    csv_probs = [float(r[f"w_ep_p[{spec.labels[0]}]"]) for r in rows]
    np.testing.assert_allclose(probs(loaded, "w_ep")[:, 0], csv_probs, atol=TOL, rtol=0)

    before = (tmp_path / "p.csv").read_bytes()
    code, _, err = run([*argv, "--out", str(tmp_path / "p.csv")], capsys)
    assert code != 0 and "p.csv" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "p.csv").read_bytes() == before


def test_bad_inputs_are_one_line(stage, synth_root, tmp_path):
    images = write_split_images(synth_root, FLAGS[0], tmp_path / "images")
    (images / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"broken.png: not a readable image"):
        Classifier.load(stage[0], FLAGS[0], device="cpu").predict(images)
    with pytest.raises(ConfigError, match=r"--dataset: 'pneumoniamnist' is not among the stage's tuned datasets"):
        Classifier.load(stage[0], "pneumoniamnist", device="cpu")
    assert Classifier.load(stage[0], FLAGS[0].upper(), device="cpu").spec.flag == FLAGS[0]  # flags as typed
    wide = make_tsm_ckpt(synth_root, FLAGS, tmp_path / "wide.ckpt", embed_dim=48)
    with pytest.raises(ConfigError, match=r"--tsm_ckpt: .*wide.ckpt gives 48-wide features but .* takes 32"):
        Classifier.load(stage[0], FLAGS[0], tsm_ckpt=wide, device="cpu")
    other = make_tsm_ckpt(synth_root, ["pneumoniamnist"], tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match=r"--tsm_ckpt: .*other.ckpt was trained on \['pneumoniamnist'\]"):
        Classifier.load(stage[0], FLAGS[0], tsm_ckpt=other, device="cpu")
    with pytest.raises(ConfigError, match=r"--device: cuda:7, but this machine has"):
        Classifier.load(stage[0], FLAGS[0], device="cuda:7")
    hp = torch.load(stage[0], weights_only=True)["hyper_parameters"]
    cached = ExemplarPromptTuning(tsm_ckpt=hp["tsm_ckpt"], vlm=hp["vlm"], datasets=[FLAGS[0]])  # the feature cache on
    with pytest.raises(ConfigError, match=r"feature_cache false"):
        Classifier(cached)
    with pytest.raises(ConfigError, match=r"--dataset: the stage was tuned on"):
        Classifier.load(stage[0], device="cpu")
    with pytest.raises(MissingFileError, match=r"--tsm_ckpt: .*nope.ckpt.*--ep false"):
        Classifier.load(stage[0], FLAGS[0], tsm_ckpt=str(tmp_path / "nope.ckpt"), device="cpu")
    with pytest.raises(ConfigError, match=r"--tsm_ckpt: .* --ep is false"):
        Classifier.load(stage[0], FLAGS[0], tsm_ckpt="x.ckpt", ep=False, device="cpu")
    with pytest.raises(MissingFileError, match=r"--model: .* is a folder without vitask_export.json"):
        Classifier.load(tmp_path, FLAGS[0])
    gray = np.zeros((28, 28), np.uint8)  # dermamnist is RGB
    clf = Classifier.load(stage[0], FLAGS[0], device="cpu")
    with pytest.raises(ConfigError, match=r"images\[0\]: gray but the dataset is RGB; pass --convert true"):
        clf.predict([gray])
    with pytest.raises(ConfigError, match=r"images\[0\]: an array of float64"):
        clf.predict([np.zeros((28, 28, 3))])
    from vitask_pl.classify import classify

    with pytest.raises(ConfigError, match=r"--out: .*p.txt is neither .csv nor .json"):
        classify([str(images)], stage[0], FLAGS[0], out=str(tmp_path / "p.txt"))


@pytest.mark.slow
def test_digits_import_check_tsm_vlm_test_and_classify_agree(digits_tree, feature_cache_dir, tmp_path, capsys):
    """scikit-learn's digit PNGs through the README's commands: import, check, a TSM, stage 1 on them, then `vitask
    test`, `vitask predict` and `vitask classify` on the original files of the test split agree."""
    from .conftest import stage_configs, tsm_fit

    data, runs = tmp_path / "data", tmp_path / "runs"
    digits = ["--root", str(data), "--name", "digits", "--modality", "handwritten digit"]
    assert run(["data", "import", "--source", str(digits_tree), *digits], capsys)[0] == 0
    assert run(["data", "check", "--root", str(data), "--datasets", "[digits]"], capsys)[0] == 0
    code, _, err = run(tsm_fit(data, runs / "tsm", datasets="[digits]"), capsys)
    assert code == 0, err
    tsm = str(runs / "tsm/checkpoints/last.ckpt")
    code, _, err = run(
        tsm_fit(data, runs / "tsm_test", "--ckpt_path", tsm, command="test", datasets="[digits]"), capsys
    )
    assert code == 0, err
    assert "digits" in json.loads(next((runs / "tsm_test").rglob("metrics.json")).read_text())

    where = ["--data.root", str(data), "--data.datasets", "[digits]", "--data.num_workers", "0"]
    where += ["--model.init_args.vlm", "tiny:internvl", "--model.init_args.tsm_ckpt", tsm]
    where += ["--model.init_args.exemplar.cache_dir", feature_cache_dir, "--trainer.enable_progress_bar", "false"]
    fit = ["fit", *stage_configs("ep"), *where, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"]
    code, _, err = run([*fit, "--data.batch_size", "4", "--trainer.default_root_dir", str(runs / "ep")], capsys)
    assert code == 0, err
    stage = str(runs / "ep/checkpoints/last.ckpt")
    for command in ("test", "predict"):
        argv = [command, *stage_configs("ep"), *where, "--ckpt_path", stage]
        code, _, err = run([*argv, "--trainer.default_root_dir", str(runs / command)], capsys)
        assert code == 0, err
    metrics = json.loads(next((runs / "test").rglob("metrics.json")).read_text())
    predicted = read_csv(next((runs / "predict").rglob("predictions.csv")))

    with open(data / "digits.files.csv") as f:
        test_files = [m for m in csv.DictReader(f) if m["split"] == "test"]
    assert [int(m["row"]) for m in test_files] == list(range(len(test_files)))
    images = f"[{','.join(m['path'] for m in test_files)}]"
    out = tmp_path / "classified.csv"
    code, _, err = run(["classify", "--model", stage, "--images", images, "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, err  # --dataset defaults to the stage's one dataset
    rows = read_csv(out)
    assert [r["image"] for r in rows] == [m["path"] for m in test_files]
    for mode in ("wo_ep", "w_ep"):
        reference = by_index(predicted, "digits", mode)
        ours = [[float(v) for k, v in r.items() if k.startswith(f"{mode}_p[")] for r in rows]
        np.testing.assert_allclose(ours, [reference[i] for i in range(len(rows))], atol=TOL, rtol=0)
        acc = np.mean([r[f"{mode}_answer"] == m["label"] for r, m in zip(rows, test_files)])
        assert acc == pytest.approx(metrics[mode]["score"]["digits"]["acc"], abs=1e-6)
