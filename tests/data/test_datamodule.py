import numpy as np
import pytest

from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.data.dataset import JointSampler
from vitask_pl.data.negatives import NegativeSampler
from vitask_pl.errors import ConfigError, MissingFileError

from ..conftest import SMALL_FLAGS


def test_joint_dataset_samples_carry_dataset_text_and_label(synth_root):
    dm = MedMNISTDataModule(synth_root, SMALL_FLAGS, 28, num_workers=0)
    ds = dm.dataset("train")
    assert len(ds) == sum(len(p.labels) for p in dm.load("train"))
    seen = set()
    for key in range(0, len(ds), 7):
        s = ds[key]
        spec = dm.specs[s["dataset"]]
        seen.add(spec.flag)
        assert s["image"].shape == (28, 28, spec.n_channels) and s["image"].dtype == np.uint8
        assert s["instruction"].startswith(f"Analyze the given {spec.modality} image.")
        if not spec.multi_label:
            assert s["response"] == spec.labels[int(s["label"][0])]
    assert seen == set(SMALL_FLAGS)


def test_max_samples_caps_each_dataset_deterministically(synth_root):
    a = MedMNISTDataModule(synth_root, SMALL_FLAGS, 28, max_samples=5, num_workers=0).load("val")
    b = MedMNISTDataModule(synth_root, SMALL_FLAGS, 28, max_samples=5, num_workers=0).load("val")
    assert all(len(p.labels) <= 5 for p in a)
    assert all(np.array_equal(x.images, y.images) for x, y in zip(a, b))


def test_sampling_weights_set_the_odds_of_each_dataset():
    sampler = JointSampler([100, 1000], shuffle=True, weights=[3.0, 1.0], num_samples=4000, seed=0)
    indices = np.array([i for i, _ in sampler])
    assert abs((indices < 100).mean() - 0.75) < 0.03
    assert len(sampler) == 4000


def test_sampler_epoch_changes_order_reproducibly():
    epoch = {"e": 0}
    sampler = JointSampler([10, 20], shuffle=True, seed=1, epoch_fn=lambda: epoch["e"])
    first, again = list(sampler), list(sampler)
    epoch["e"] = 1
    second = list(sampler)
    assert first == again and first != second and sorted(i for i, _ in second) == list(range(30))
    assert {e for _, e in second} == {1}


def test_negative_sampler_same_dataset_different_label_deterministic():
    labels = np.array([[0], [0], [1], [2], [2], [1]])
    neg = NegativeSampler(labels, seed=3)
    for i in range(len(labels)):
        draws = {neg(i, epoch) for epoch in range(30)}
        assert all(labels[j, 0] != labels[i, 0] for j in draws)
        assert draws == {j for j in range(6) if labels[j, 0] != labels[i, 0]}  # uniform over all of them
        assert neg(i, 4) == NegativeSampler(labels, seed=3)(i, 4)


def test_negative_sampler_multilabel_means_different_vector():
    labels = np.array([[0, 0], [1, 0], [1, 0], [1, 1]])
    neg = NegativeSampler(labels)
    for epoch in range(20):
        j = neg(1, epoch)
        assert not np.array_equal(labels[j], labels[1])


def test_single_class_split_is_a_clear_error():
    with pytest.raises(ConfigError, match="breastmnist/train: every sample has the same label"):
        NegativeSampler(np.zeros((5, 1), int), name="breastmnist/train")


def test_training_samples_get_negatives_when_asked(synth_root):
    dm = MedMNISTDataModule(synth_root, ["dermamnist"], 28, num_workers=0)
    ds = dm.dataset("train", negatives=True)
    s = ds[(3, 2)]
    labels = dm.load("train")[0].labels
    assert labels[s["negative_index"], 0] != labels[s["index"], 0]
    assert np.array_equal(s["negative_image"], dm.load("train")[0].images[s["negative_index"]])


def test_init_fails_fast_on_missing_files_and_bad_options(tmp_path, synth_root):
    with pytest.raises(MissingFileError, match="dermamnist_64.npz not found"):
        MedMNISTDataModule(tmp_path, ["dermamnist"], 64)
    with pytest.raises(ConfigError, match="--data.sampling_weights"):
        MedMNISTDataModule(synth_root, ["dermamnist"], 28, sampling_weights={"bloodmnist": 2.0})
    with pytest.raises(ConfigError, match="--data.batch_size: 0"):
        MedMNISTDataModule(synth_root, ["dermamnist"], 28, batch_size=0)


def test_incomplete_instruction_option(synth_root):
    dm = MedMNISTDataModule(synth_root, ["dermamnist"], 28, incomplete_instruction=True, num_workers=0)
    assert dm.dataset("test")[0]["instruction"] == "Analyze the given dermatoscope image."


def test_training_batches_do_not_depend_on_the_number_of_workers(synth_root):
    # The offline overlay runs without loader workers (faster on a CPU); results must not change with it:
    # negatives and shifts are seeded per sample, not drawn from a worker's RNG.
    def epoch(workers: int) -> list:
        dm = MedMNISTDataModule(synth_root, SMALL_FLAGS, 28, batch_size=4, num_workers=workers, augment_shift=2)
        samples = lambda batch: batch  # noqa: E731 - the raw samples, no tokenizer needed
        loader = dm.loader("train", samples, train=True, negatives=True)
        return [(s["image"], s["negative_image"], s["label"]) for batch in loader for s in batch]

    alone, with_workers = epoch(0), epoch(2)
    assert len(alone) == len(with_workers) > 0
    assert all(all(np.array_equal(a, b) for a, b in zip(x, y)) for x, y in zip(alone, with_workers))
