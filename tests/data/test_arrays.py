"""Memory-mapped image arrays: the same values as reading the .npz, converted once, never half-written."""

from pathlib import Path

import numpy as np
import pytest

from vitask_pl.data import arrays
from vitask_pl.data.catalog import dataset_specs
from vitask_pl.data.files import load_split


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITASK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "arrays"


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_mapped_equals_the_member_and_is_a_memory_map(tmp_path, save, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (37, 28, 28, 3), dtype=np.uint8)
    path = tmp_path / "x.npz"
    save(path, train_images=images, train_labels=np.zeros((37, 1)))
    monkeypatch.setattr(arrays, "CHUNK", 1000)  # many chunks, one of them partial
    out = arrays.mapped(path, "train_images")
    assert isinstance(out, np.memmap) and out.dtype == np.uint8 and not out.flags.writeable
    np.testing.assert_array_equal(out, images)


def test_converted_once_and_again_when_the_file_changes(tmp_path, cache):
    path = tmp_path / "x.npz"
    np.savez(path, train_images=np.ones((4, 2, 2), np.uint8))
    first = Path(arrays.mapped(path, "train_images").filename)
    stamp = first.stat().st_mtime_ns
    again = arrays.mapped(path, "train_images")
    assert Path(again.filename) == first and first.stat().st_mtime_ns == stamp and first.is_relative_to(cache)
    np.savez(path, train_images=np.full((5, 2, 2), 7, np.uint8))  # replaced: new size and mtime
    replaced = arrays.mapped(path, "train_images")
    assert Path(replaced.filename) != first and replaced.shape == (5, 2, 2) and int(replaced[0, 0, 0]) == 7


def test_an_interrupted_conversion_leaves_nothing(tmp_path, cache, monkeypatch):
    path = tmp_path / "x.npz"
    np.savez(path, train_images=np.ones((4, 2, 2), np.uint8))

    def broken(npz, member, out):
        out.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(arrays, "_stream", broken)
    with pytest.raises(OSError, match="disk full"):
        arrays.mapped(path, "train_images")
    assert not [p for p in cache.rglob("*") if p.is_file()]  # neither the target nor its temporary


def test_load_split_memory_mapped_equals_in_memory(synth_root):
    spec = dataset_specs(["pneumoniamnist"])[0]  # gray: the (N, H, W) -> (N, H, W, 1) view
    whole = load_split(synth_root, spec, 28, "train")
    lazy = load_split(synth_root, spec, 28, "train", memory_map=True)
    assert isinstance(lazy.images.base, np.memmap) or isinstance(lazy.images, np.memmap)
    assert lazy.images.shape == whole.images.shape and lazy.images.shape[-1] == 1
    np.testing.assert_array_equal(lazy.images, whole.images)
    np.testing.assert_array_equal(lazy.labels, whole.labels)


def test_samples_of_a_memory_mapped_split_are_writable_copies(synth_root):
    """Processors hand images to torch.from_numpy, which warns on (and must not write to) a read-only map."""
    from vitask_pl.data.datamodule import MedMNISTDataModule

    ds = MedMNISTDataModule(synth_root, ["dermamnist"], 28, num_workers=0, memory_map=True).dataset(
        "train", negatives=True
    )
    sample = ds[0]
    assert sample["image"].flags.writeable and sample["negative_image"].flags.writeable
    assert not np.shares_memory(sample["image"], ds.splits[0].images)
