import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub lookup must fail at once, never retry for minutes

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vitask_pl.atomic import publish_dir  # noqa: E402
from vitask_pl.data.catalog import FLAGS, dataset_specs  # noqa: E402
from vitask_pl.data.prompts import candidate_responses, instruction  # noqa: E402
from vitask_pl.errors import ConfigError  # noqa: E402
from vitask_pl.models import tiny  # noqa: E402
from vitask_pl.models.families import FAMILY_NAMES  # noqa: E402

EXPECTED = {  # family -> (model class, processor class); written out so a wrong registry entry fails
    "internvl": ("InternVLForConditionalGeneration", "InternVLProcessor"),
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor"),
}
END_OF_TURN = {"internvl": "<|im_end|>", "llava": "</s>", "qwen2_vl": "<|im_end|>", "idefics3": "<end_of_utterance>"}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def loaded(request, tmp_path_factory):
    """(family, model, processor) loaded back from a fresh build, shared by the tests of this module."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family = request.param
    out = tiny.build_tiny_vlm(family, str(tmp_path_factory.mktemp("tiny") / family))
    return family, AutoModelForImageTextToText.from_pretrained(out), AutoProcessor.from_pretrained(out)


def dermamnist_chat(processor, answer: str | None = "melanoma") -> str:
    spec = dataset_specs(["dermamnist"])[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction(spec)}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)


def image28() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))


def language_model(model):
    return model.model.text_model if hasattr(model.model, "text_model") else model.model.language_model


def test_loads_as_real_classes(loaded):
    family, model, processor = loaded
    assert (type(model).__name__, type(processor).__name__) == EXPECTED[family]
    assert sum(p.numel() for p in model.parameters()) < 8_000_000
    assert processor.image_token_id == model.config.image_token_id
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[family])


def test_chat_image_tokens_match_features_and_train(loaded):
    family, model, processor = loaded
    text = dermamnist_chat(processor)
    assert "Analyze the given dermatoscope image." in text and text.rstrip("\n").endswith(
        "melanoma" + END_OF_TURN[family]
    )
    prompt = dermamnist_chat(processor, answer=None)
    assert text.startswith(prompt)  # the generation prompt is a prefix of the trained conversation

    inputs = processor(text=text, images=[image28()], return_tensors="pt")
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    image_kwargs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw", "pixel_attention_mask")}
    features = model.model.get_image_features(**image_kwargs).pooler_output
    # transformers 5: a list/tuple of (tokens, hidden) per image, except InternVL's (images, tokens, hidden) tensor.
    n_features = (
        sum(f.shape[0] for f in features) if isinstance(features, (list, tuple)) else features.shape[:-1].numel()
    )
    assert 1 <= n_tokens <= 16 and n_tokens == n_features

    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in language_model(model).parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_labels_are_whole_tokens(loaded):
    _, _, processor = loaded
    tok = processor.tokenizer
    assert len(tok("melanoma").input_ids) <= 3
    pre_tokenize = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    for spec in dataset_specs(FLAGS):
        for label in candidate_responses(spec):
            # every word (as the byte-level pre-tokenizer splits it) of every label is a single learned token
            assert len(tok(label).input_ids) == len(pre_tokenize(label)), label


def test_generate(loaded):
    _, model, processor = loaded
    inputs = processor(text=dermamnist_chat(processor, answer=None), images=[image28()], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_deterministic_from_seed(family, tmp_path):
    from safetensors.torch import load_file

    def build(name, seed):
        out = tiny.build_tiny_vlm(family, str(tmp_path / name), seed=seed)
        return load_file(os.path.join(out, "model.safetensors")), open(os.path.join(out, "tokenizer.json")).read()

    (a, tok_a), (b, tok_b), (c, _) = build("a", 0), build("b", 0), build("c", 1)
    assert tok_a == tok_b and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "llava"
    tiny.build_tiny_vlm("llava", str(out))
    (out / "marker").write_text("old")
    with pytest.raises(ConfigError, match="--force") as err:
        tiny.build_tiny_vlm("llava", str(out))
    assert "--out" in str(err.value) and str(out) in str(err.value) and "\n" not in str(err.value)
    assert (out / "marker").exists()

    tiny.build_tiny_vlm("llava", str(out), force=True)
    assert not (out / "marker").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava"]  # no temporary or old copies left behind


def test_unknown_family():
    with pytest.raises(ConfigError) as err:
        tiny.build_tiny_vlm("llama", "/nonexistent/never-written")
    message = str(err.value)
    assert "--family" in message and "'llama'" in message and all(f in message for f in FAMILY_NAMES)


def test_resolve_tiny_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("VITASK_CACHE", str(tmp_path))
    assert tiny.tiny_cache_dir() == tmp_path / "tiny"
    assert tiny.resolve_tiny("org/some-model") == "org/some-model"

    path = tiny.resolve_tiny("tiny:llava")
    assert path == str(tmp_path / "tiny" / f"llava-28px-{tiny.VERSION}")
    assert os.path.exists(os.path.join(path, "model.safetensors"))

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached tiny model")

    monkeypatch.setattr(tiny, "_write", no_rebuild)
    assert tiny.resolve_tiny("tiny:llava") == path
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [f"llava-28px-{tiny.VERSION}"]


def test_losing_a_build_race_keeps_the_winner(tmp_path):
    out, tmp = tmp_path / "model", tmp_path / ".model.tmp"
    out.mkdir()
    (out / "config.json").write_text("winner")
    tmp.mkdir()
    (tmp / "config.json").write_text("loser")
    assert not publish_dir(tmp, out, replace=False)
    assert (out / "config.json").read_text() == "winner" and not tmp.exists()


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("VITASK_CACHE", raising=False)
    assert tiny.tiny_cache_dir() == Path.home() / ".cache" / "vitask" / "tiny"
