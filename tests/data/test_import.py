"""`vitask data import` on files nobody here wrote: scikit-learn's 8x8 digits and pydicom's bundled DICOMs."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from vitask_pl.data.cards import read_cards
from vitask_pl.data.catalog import dataset_specs, resolve_flags
from vitask_pl.data.check import check
from vitask_pl.data.files import load_split, npz_path
from vitask_pl.data.images import read_image, to_array, window
from vitask_pl.data.importer import import_dataset, manifest_path, stratified_split
from vitask_pl.data.prompts import instruction
from vitask_pl.errors import ConfigError

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def test_digits_import_writes_the_medmnist_layout_and_a_card(digits_tree, tmp_path):
    out = import_dataset(str(digits_tree), "digits", root=str(tmp_path), modality="handwritten digit", size=28)
    assert out == npz_path(tmp_path, "digits", 28)
    card = json.loads((tmp_path / "digits.card.json").read_text())
    assert card["labels"] == [str(i) for i in range(10)] and card["n_channels"] == 1 and card["shares"] is None
    assert sum(card["n_samples"].values()) == 200
    with np.load(out) as npz:
        assert npz["train_images"].dtype == np.uint8 and npz["train_images"].shape[1:] == (28, 28)
        assert npz["train_labels"].shape[1] == 1
        for split in ("train", "val", "test"):  # stratified: every class in every split
            assert set(npz[f"{split}_labels"][:, 0]) == set(range(10))
    assert check(str(tmp_path), ["digits"], 28)
    # The catalog names it like a flag; its instruction uses its own modality and labels.
    cards = read_cards(tmp_path, ["digits", "dermamnist"])
    specs = dataset_specs(resolve_flags(["digits", "dermamnist"], cards=cards), cards)
    assert specs[0].labels == tuple(str(i) for i in range(10)) and specs[1].offset == 10
    assert instruction(specs[0]).startswith("Analyze the given handwritten digit image.")
    split = load_split(tmp_path, specs[0], 28, "test")
    assert split.images.shape[1:] == (28, 28, 1)
    # The manifest says which file each row is: its label folder, and its pixels through the one preprocessing.
    with open(manifest_path(out)) as f:
        manifest = list(csv.DictReader(f))
    assert len(manifest) == 200 and sorted({m["path"] for m in manifest}) == sorted(
        map(str, digits_tree.rglob("*.png"))
    )
    with np.load(out) as npz:
        for m in manifest[::17]:
            row = int(m["row"])
            assert m["label"] == digits_tree.joinpath(m["path"]).parent.name == str(npz[f"{m['split']}_labels"][row, 0])
            assert np.array_equal(npz[f"{m['split']}_images"][row], to_array(read_image(m["path"]), 28, 1))


def test_the_resize_is_a_centre_crop_and_one_bicubic_resize():
    """Against properties a centre crop and a bicubic filter must have, not against PIL called the same way."""
    # The crop keeps exactly the centre square: white side bands of 10 columns vanish, even at the edges.
    banded = np.zeros((40, 60, 3), np.uint8)
    banded[:, :10] = banded[:, 50:] = 255
    assert not to_array(banded, 28, 3).any()
    assert to_array(np.full((60, 40), 77, np.uint8), 28, 1).tolist() == np.full((28, 28), 77).tolist()
    # Downsampling a horizontal ramp keeps it a ramp, sampled at the output pixels' centres in source coordinates
    # (bicubic reproduces linear functions away from the borders).
    ramp = np.tile(np.arange(112, dtype=np.uint8)[None], (112, 1))
    out = to_array(ramp, 28, 1).astype(float)
    centres = (np.arange(28) + 0.5) * 4 - 0.5
    assert np.abs(out[14, 3:-3] - centres[3:-3]).max() <= 1
    # Upsampling a step overshoots on both sides: a cubic kernel's negative lobes (bilinear or nearest would not).
    step = np.where(np.arange(8)[None] < 4, 50, 200).astype(np.uint8).repeat(8, 0)
    up = to_array(step, 28, 1)
    assert up.min() < 50 and up.max() > 200
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    with pytest.raises(ConfigError, match="RGB but the dataset is gray; pass --convert true"):
        to_array(image, 28, 1)
    gray = to_array(image, 28, 1, convert=True)
    assert gray.shape == (28, 28)


def test_stratified_split_is_seeded_and_keeps_every_class():
    labels = np.repeat(np.arange(3), 10)
    a, b = stratified_split(labels, (0.7, 0.1, 0.2), 0), stratified_split(labels, (0.7, 0.1, 0.2), 0)
    assert np.array_equal(a, b) and not np.array_equal(a, stratified_split(labels, (0.7, 0.1, 0.2), 1))
    for k in range(3):
        assert set(labels[a == k]) == {0, 1, 2}
    assert [(a == k).sum() for k in range(3)] == [21, 3, 6]


def _dicom_values(name):
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(get_testdata_file(name))
    return ds, apply_modality_lut(ds.pixel_array, ds).astype(np.float64)


def test_ct_dicom_rescales_to_its_own_range():
    """CT_small has no window: the modality LUT's values (HU), min to max, become 0-255."""
    ds, values = _dicom_values("CT_small.dcm")
    image = read_image(get_testdata_file("CT_small.dcm"))
    assert image.dtype == np.uint8 and image.shape == (ds.Rows, ds.Columns)
    expected = np.round((values - values.min()) / (values.max() - values.min()) * 255)
    assert np.array_equal(image, expected.astype(np.uint8))


def test_mr_dicom_uses_its_window():
    ds, values = _dicom_values("MR_small.dcm")
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.clip(np.round(((values - (c - 0.5)) / (w - 1) + 0.5) * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(read_image(get_testdata_file("MR_small.dcm")), expected)
    # The same pixels RLE-compressed decode to the same image.
    assert np.array_equal(read_image(get_testdata_file("MR_small_RLE.dcm")), expected)
    assert window(np.array([c - 0.5 - (w - 1) / 2 - 1, c + w]), c, w).tolist() == [0, 255]


def test_monochrome1_is_inverted(tmp_path):
    """pydicom ships no MONOCHROME1 image; the same CT pixels declared MONOCHROME1 must come out inverted."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inverted.dcm")
    assert np.array_equal(read_image(tmp_path / "inverted.dcm"), 255 - read_image(get_testdata_file("CT_small.dcm")))


def test_dicom_without_pixel_data_is_one_line():
    with pytest.raises(ConfigError, match="without pixel data"):
        read_image(get_testdata_file("rtplan.dcm"))


def test_dicom_tree_imports_and_checks(tmp_path):
    """Two classes of real DICOMs (CT and MR, raw and RLE) in class folders, resized to 64 px."""
    tree = tmp_path / "tree"
    for label, names in {
        "ct": ["CT_small.dcm"] * 3,
        "mr": ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small.dcm"],
    }.items():
        (tree / label).mkdir(parents=True)
        for i, name in enumerate(names):
            shutil.copy(get_testdata_file(name), tree / label / f"{i}.dcm")
    import_dataset(
        str(tree), "scans", root=str(tmp_path / "data"), size=64, modality="CT or MR", fractions=(0.34, 0.33, 0.33)
    )
    assert check(str(tmp_path / "data"), ["scans"], 64)
    with np.load(npz_path(tmp_path / "data", "scans", 64)) as npz:
        assert npz["train_images"].shape[1:] == (64, 64)


def _aptos(tmp_path, rows):
    """A CSV of id_code,diagnosis and a folder of PNGs, as APTOS 2019 ships them."""
    from PIL import Image

    images = tmp_path / "train_images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    with open(tmp_path / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id_code", "diagnosis"])
        for i, grade in enumerate(rows):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(images / f"id{i}.png")
            writer.writerow([f"id{i}", grade])
    return ["--source", str(tmp_path / "train.csv"), "--image_dir", str(images), "--path_column", "id_code"]


def test_aptos_layout_shares_retinamnist(tmp_path):
    args = _aptos(tmp_path, [g for g in range(5) for _ in range(6)])
    options = dict(image_dir=args[3], path_column="id_code", label_column="diagnosis", suffix=".png")
    import_dataset(args[1], "aptos", root=str(tmp_path / "d"), shares="retinamnist", **options)
    card = json.loads((tmp_path / "d" / "aptos.card.json").read_text())
    assert card["shares"] == "retinamnist" and card["labels"] is None and card["modality"] is None
    cards = read_cards(tmp_path / "d", ["aptos", "retinamnist"])
    aptos, retina = dataset_specs(["aptos", "retinamnist"], cards)
    assert aptos.labels == retina.labels and aptos.offset == retina.offset == 0  # one block of the joint head
    assert instruction(aptos) == instruction(retina)


def test_dicom_without_pydicom_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pydicom is not installed; pip install 'vitask\[dicom\]'"):
        read_image(get_testdata_file("CT_small.dcm"))
