"""The tiny generalist: built offline, deterministic in its seed, and good at its own pretraining tasks."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vitask_pl.models import tiny
from vitask_pl.models.generalist import evaluate


def _weights(path):
    return load_file(f"{path}/model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["internvl", "qwen2_vl"])
def test_same_seed_builds_the_same_generalist(family, tmp_path):
    """A few pretraining steps through the whole recipe: same seed, same weights; another seed, other weights."""
    a, b, c = (
        tiny.build_tiny_vlm(family, str(tmp_path / n), seed=s, generalist_steps=3, held_out=4)
        for n, s in (("a", 0), ("b", 0), ("c", 1))
    )
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert any(not (wa[k] == wc[k]).all() for k in wa)
    card = json.loads((tmp_path / "a" / "generalist.json").read_text())
    assert (
        card["steps"] == 3
        and card["held_out"]["choice"]["n"] == 4
        and card["recipe"] == tiny.GENERALIST_VERSION
        and card["dims"]["hidden"] == 128
    )
    # Every weight trained, the vision tower included: none is still at its initialisation (seed 0, zero steps).
    init = _weights(tiny.build_tiny_vlm(family, str(tmp_path / "init"), seed=0, generalist_steps=1, held_out=4))
    vision = [k for k in wa if "vision" in k or "visual" in k]
    assert vision and any(not (wa[k] == init[k]).all() for k in vision)


@pytest.mark.slow
def test_generalist_answers_held_out_questions_of_its_own_tasks_well_above_chance():
    """The cached `tiny:internvl-generalist`, re-loaded from disk and asked questions no training step drew."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny.resolve_tiny("tiny:internvl-generalist")
    model, processor = AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
    scores = evaluate(model.eval(), processor, image_size=28, seed=0, n=200)
    for task in ("question", "choice"):
        assert scores[task]["accuracy"] > scores[task]["chance"] + 0.1, (task, scores[task])
    # The weights on disk are the ones the build checked: they answer as its card recorded (to one answer in 200,
    # in case a near tie in greedy decoding falls the other way under another thread count).
    card = json.loads(Path(path, "generalist.json").read_text())["held_out"]
    for task in scores:
        assert abs(scores[task]["accuracy"] - card[task]["accuracy"]) <= 1 / 200 + 1e-9, task


@pytest.mark.slow
def test_tiny_vlm_command_builds_a_generalist(tmp_path, capsys):
    """`vitask tiny-vlm --family internvl --generalist --out DIR`, in short form (two steps)."""
    from vitask_pl.cli import main

    out = tmp_path / "g"
    main(
        [
            "tiny-vlm",
            "--family",
            "internvl",
            "--generalist",
            "--generalist-steps",
            "2",
            "--held-out",
            "2",
            "--out",
            str(out),
        ]
    )
    assert "generalist: 2 image-text pretraining steps" in capsys.readouterr().out
    assert json.loads((out / "generalist.json").read_text())["steps"] == 2


def test_generalist_tokenizer_never_learned_a_medmnist_label():
    """Its tokenizer is learned on the generic corpus alone: a label name is several sub-word pieces."""
    from vitask_pl.data.catalog import FLAGS, dataset_specs

    tok = tiny._train_tokenizer(tiny.RECIPES["internvl"], tiny._corpus(generalist=True), tiny.GENERALIST_VOCAB)
    labels = [label for spec in dataset_specs(FLAGS) for label in spec.labels if len(label) > 5]
    assert all(len(tok(label)["input_ids"]) > 1 for label in labels)


def test_generalist_spec_is_cached_under_its_recipe_version(tmp_path, monkeypatch):
    monkeypatch.setenv("VITASK_CACHE", str(tmp_path))
    build, folder = tiny.spec_build("tiny:qwen2_vl-generalist", 28)
    assert folder == f"qwen2_vl-generalist-28px-{tiny.GENERALIST_VERSION}"
    assert build.generalist_steps == tiny.GENERALIST_STEPS and build.dims == tiny.GENERALIST
    with pytest.raises(ValueError, match="--family: unknown tiny VLM family 'llama'"):
        tiny.spec_build("tiny:llama-generalist", 28)
