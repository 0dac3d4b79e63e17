import numpy as np
import pytest

from vitask_pl.data.catalog import dataset_specs
from vitask_pl.data.files import load_split, npz_path
from vitask_pl.errors import ConfigError, MissingFileError

DERMA, CHEST = dataset_specs(["dermamnist", "chestmnist"])


def write(root, flag, size=28, **overrides):
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        if flag == "chestmnist":
            arrays[f"{split}_images"] = np.zeros((n, size, size), np.uint8)
            arrays[f"{split}_labels"] = np.eye(14, dtype=np.uint8)[:n]
        else:
            arrays[f"{split}_images"] = np.zeros((n, size, size, 3), np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % 7)[:, None].astype(np.uint8)
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(npz_path(root, flag, size), **arrays)


def test_valid_file_loads_as_nhwc(tmp_path):
    write(tmp_path, "chestmnist", size=64)
    split = load_split(tmp_path, CHEST, 64, "train")
    assert split.images.shape == (6, 64, 64, 1) and split.labels.shape == (6, 14)


def test_missing_file_names_path_and_both_remedies(tmp_path):
    with pytest.raises(MissingFileError) as err:
        load_split(tmp_path, DERMA, 64, "train")
    msg = str(err.value)
    assert str(tmp_path / "dermamnist_64.npz") in msg and "download: true" in msg and "vitask data synth" in msg


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"train_images": None}, "no key 'train_images'"),
        ({"train_images": np.zeros((6, 28, 28, 3), np.float32)}, "dtype float32, expected uint8"),
        ({"train_images": np.zeros((6, 28, 28), np.uint8)}, r"shape \(6, 28, 28\), expected \(N, 28, 28, 3\).*RGB"),
        ({"train_images": np.zeros((6, 32, 32, 3), np.uint8)}, r"expected \(N, 28, 28, 3\)"),
        ({"train_labels": np.full((6, 1), 7, np.uint8)}, r"span \[7, 7\], expected \[0, 6\]"),
        ({"train_labels": np.zeros((6, 2), np.uint8)}, r"train_labels has shape \(6, 2\), expected \(6, 1\)"),
        ({"train_images": np.zeros((0, 28, 28, 3), np.uint8), "train_labels": np.zeros((0, 1), np.uint8)}, "empty"),
    ],
)
def test_bad_files_fail_with_one_line_naming_file_and_fix(tmp_path, overrides, match):
    write(tmp_path, "dermamnist", **overrides)
    with pytest.raises(ConfigError, match=match) as err:
        load_split(tmp_path, DERMA, 28, "train")
    assert "\n" not in str(err.value) and str(tmp_path / "dermamnist.npz") in str(err.value)


def test_multilabel_values_must_be_binary(tmp_path):
    write(tmp_path, "chestmnist", train_labels=np.full((6, 14), 2, np.uint8))
    with pytest.raises(ConfigError, match=r"expected \[0, 1\] for chestmnist"):
        load_split(tmp_path, CHEST, 28, "train")
