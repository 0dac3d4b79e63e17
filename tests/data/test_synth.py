import numpy as np
import pytest
from medmnist import INFO

from vitask_pl.data.catalog import FLAGS, dataset_specs
from vitask_pl.data.synth import synth_dataset, synthesize
from vitask_pl.errors import ConfigError


@pytest.mark.parametrize("flag", FLAGS)
def test_layout_matches_the_official_files(flag):
    spec = dataset_specs([flag])[0]
    arrays = synth_dataset(spec, 64, per_class=4, seed=0)
    assert sorted(arrays) == sorted(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))
    for split in ("train", "val", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        assert images.dtype == np.uint8 and labels.dtype == np.uint8
        assert images.shape[1:] == ((64, 64) if INFO[flag]["n_channels"] == 1 else (64, 64, 3))
        assert labels.shape == (len(images), 14 if flag == "chestmnist" else 1)
        if flag == "chestmnist":
            assert set(np.unique(labels)) <= {0, 1} and (labels.sum(1) == 0).any()
        else:
            assert set(np.unique(labels)) == set(range(len(INFO[flag]["label"])))  # every class in every split


def test_deterministic_in_seed():
    spec = dataset_specs(["dermamnist"])[0]
    a, b, c = (synth_dataset(spec, 28, 4, seed) for seed in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train_images"], c["train_images"])


def test_class_structure_is_learnable_but_not_trivial():
    spec = dataset_specs(["bloodmnist"])[0]
    arrays = synth_dataset(spec, 28, 60, seed=0)
    x = arrays["train_images"].reshape(len(arrays["train_images"]), -1).astype(np.float64)
    y = arrays["train_labels"][:, 0]
    xt = arrays["test_images"].reshape(len(arrays["test_images"]), -1).astype(np.float64)
    yt = arrays["test_labels"][:, 0]
    centroids = np.stack([x[y == k].mean(0) for k in range(8)])
    pred = ((xt[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    acc = (pred == yt).mean()
    assert 0.25 < acc < 0.95  # well above chance (0.125), yet no constant image per class
    assert min(x[y == k].std(0).mean() for k in range(8)) > 5  # images of one class vary


def test_never_overwrites_without_force(tmp_path):
    synthesize(tmp_path, ["breastmnist"], per_class=2)
    before = (tmp_path / "breastmnist.npz").read_bytes()
    with pytest.raises(ConfigError, match="already exists.*--force"):
        synthesize(tmp_path, ["breastmnist"], per_class=3, seed=5)
    assert (tmp_path / "breastmnist.npz").read_bytes() == before
    synthesize(tmp_path, ["breastmnist"], per_class=3, seed=5, force=True)
    assert (tmp_path / "breastmnist.npz").read_bytes() != before
