"""The generic pretraining corpus: deterministic, well-formed, and free of anything from the MedMNIST task."""

import re

import numpy as np

from vitask_pl.data import generic
from vitask_pl.data.catalog import FLAGS, MODALITY, dataset_specs


def _conversations(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = generic.random_scene(rng)
        out.append((scene, generic.render(scene, 28, rng), generic.conversation(scene, rng)))
    return out


def test_same_seed_same_corpus_other_seed_other_corpus():
    a, b, c = _conversations(0, 50), _conversations(0, 50), _conversations(1, 50)
    assert all(np.array_equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def test_images_are_rgb_uint8_and_gray_scenes_have_equal_channels():
    for scene, image, _ in _conversations(0, 100):
        assert image.shape == (28, 28, 3) and image.dtype == np.uint8
        equal = (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
        assert equal == scene.gray


def test_multiple_choice_lists_the_answer_among_its_options():
    for scene, _, (task, instruction, response) in _conversations(0):
        if task in ("choice", "caption choice"):
            options = instruction.rsplit(": ", 1)[1].rstrip(".").split(", ")
            assert response in options and len(options) >= 2
        if task == "question":
            assert response in dict((q, p) for q, _, p in scene.questions())[instruction]


def test_no_medmnist_label_modality_or_instruction_reaches_the_corpus():
    texts = " ".join(generic.corpus_texts()).lower()
    texts += " ".join(f"{c[2][1]} {c[2][2]}" for c in _conversations(0)).lower()
    words = set(re.findall(r"[a-z][a-z-]+", texts))
    for spec in dataset_specs(FLAGS):
        for label in spec.labels:
            assert label.lower() not in texts, label
    for phrase in MODALITY.values():
        assert phrase.lower() not in texts, phrase
    assert not {"diagnoses", "analyze", "diagnosis"} & words
