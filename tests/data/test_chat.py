"""ChatBatch against each family's own processor: same tokens, labels on the response only, candidates."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vitask_pl.data.chat import ChatBatch, messages, rgb
from vitask_pl.data.collate import IGNORE
from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.data.prompts import NO_FINDING, candidate_responses
from vitask_pl.errors import ConfigError
from vitask_pl.models.families import FAMILY_NAMES

# Written out, not read from the code under test: the token each family's chat template ends a turn with.
END_OF_TURN = {"internvl": "<|im_end|>", "llava": "</s>", "qwen2_vl": "<|im_end|>", "idefics3": "<end_of_utterance>"}
FLAGS = ["dermamnist", "chestmnist"]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_processor(request, tiny_dirs):
    from transformers import AutoProcessor

    return request.param, AutoProcessor.from_pretrained(tiny_dirs[request.param])


@pytest.fixture(scope="module")
def data(synth_root):
    dm = MedMNISTDataModule(synth_root, FLAGS, 28, num_workers=0)
    return dm, dm.dataset("train", negatives=True)


def pick(ds, flag: str, want=lambda s: True) -> dict:
    """The first training sample of ``flag`` whose response satisfies ``want``."""
    d = [s.flag for s in ds.specs].index(flag)
    for i in range(int(ds.offsets[d]), int(ds.offsets[d + 1])):
        if want(ds[i]):
            return ds[i]
    raise AssertionError(f"no {flag} sample fits")


def samples(ds) -> dict[str, dict]:
    return {
        "derma": pick(ds, "dermamnist"),
        "chest_multi": pick(ds, "chestmnist", lambda s: s["response"].count(",") >= 1),
        "chest_none": pick(ds, "chestmnist", lambda s: s["response"] == NO_FINDING),
    }


def with_image(sample) -> list[dict]:
    """The real ``messages`` structure, its image part carrying the PIL image, as HF's chat API takes it."""
    image = Image.fromarray(rgb(sample["image"]))
    turns = messages(sample["instruction"], sample["response"])
    for turn in turns:
        turn["content"] = [{**p, "image": image} if p["type"] == "image" else p for p in turn["content"]]
    return turns


@pytest.mark.parametrize("which", ["derma", "chest_multi", "chest_none"])
def test_tokens_equal_the_processors_own_chat_template(family_processor, data, which):
    family, processor = family_processor
    dm, ds = data
    sample = samples(ds)[which]
    batch = ChatBatch(processor, dm.specs)([sample])

    ref = processor.apply_chat_template(with_image(sample), tokenize=True, return_dict=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    for key, value in batch["pixel"].items():
        assert torch.equal(value, ref[key]), key
    if family == "qwen2_vl":
        assert torch.equal(batch["mm_token_type_ids"], ref["mm_token_type_ids"])

    # The prompt, as the processor tokenizes the generation prompt with the image, ends where labels start.
    image = Image.fromarray(rgb(sample["image"]))
    prompt_text = processor.apply_chat_template(
        messages(sample["instruction"]), tokenize=False, add_generation_prompt=True
    )
    prompt_len = processor(text=prompt_text, images=[image], return_tensors="pt")["input_ids"].shape[1]
    assert int(batch["prompt_len"][0]) == prompt_len

    labels = batch["labels"][0]
    labelled = (labels != IGNORE).nonzero()[:, 0].tolist()
    eot = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    ids = ref["input_ids"][0].tolist()
    first_eot_after_prompt = ids.index(eot, prompt_len)
    assert labelled == list(range(prompt_len, first_eot_after_prompt + 1))  # response + end of turn, contiguous
    assert labels[labelled].tolist() == ids[prompt_len : first_eot_after_prompt + 1]
    # LLaVA's and Idefics3's "ASSISTANT: answer" puts the separating space inside the first response token.
    assert processor.tokenizer.decode(labels[labelled[:-1]]).strip() == sample["response"]
    assert processor.tokenizer.decode(labels[labelled[-1:]]) == END_OF_TURN[family]


def test_mixed_batch_is_right_padded_with_labels_per_row(family_processor, data):
    family, processor = family_processor
    dm, ds = data
    picked = samples(ds)
    rows = [picked["chest_multi"], picked["derma"], picked["chest_none"]]
    batch = ChatBatch(processor, dm.specs)(rows)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # padding really happens
    for r, sample in enumerate(rows):
        alone = ChatBatch(processor, dm.specs)([sample])
        n = int(lengths[r])
        assert batch["attention_mask"][r, :n].all() and not batch["attention_mask"][r, n:].any()
        assert torch.equal(batch["input_ids"][r, :n], alone["input_ids"][0])
        assert torch.equal(batch["labels"][r, :n], alone["labels"][0])
        assert (batch["labels"][r, n:] == IGNORE).all()
        assert int(batch["prompt_len"][r]) == int(alone["prompt_len"][0])
    assert batch["dataset"].tolist() == [1, 0, 1] and batch["targets"].shape == (3, 7 + 14)
    assert "neg_pixel" in batch and batch["neg_pixel"]["pixel_values"].shape == batch["pixel"]["pixel_values"].shape


def test_candidates_are_every_label_response_with_end_of_turn(family_processor, data):
    family, processor = family_processor
    dm, ds = data
    picked = samples(ds)
    batch = ChatBatch(processor, dm.specs)([picked["derma"], picked["chest_multi"]])
    eot = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    assert batch["cand_ids"].shape[:2] == (2, 15) and batch["cand_valid"].shape == (2, 15)
    assert batch["cand_valid"][0].tolist() == [True] * 7 + [False] * 8
    assert batch["cand_valid"][1].all()
    assert not batch["cand_mask"][0, 7:].any()
    for row, spec in enumerate(dm.specs):
        texts = candidate_responses(spec)
        assert len(texts) == (7 if spec.flag == "dermamnist" else 15)
        for c, text in enumerate(texts):
            ids = batch["cand_ids"][row, c][batch["cand_mask"][row, c].bool()].tolist()
            assert batch["cand_mask"][row, c, : len(ids)].all()  # right-padded
            assert ids[-1] == eot and eot not in ids[:-1]
            assert processor.tokenizer.decode(ids[:-1]).strip() == text
    # A sample's own response is one of its candidates, token for token (what score-protocol accuracy relies on).
    labels = batch["labels"][0]
    own = labels[labels != IGNORE].tolist()
    c = candidate_responses(dm.specs[0]).index(picked["derma"]["response"])
    assert batch["cand_ids"][0, c][batch["cand_mask"][0, c].bool()].tolist() == own


def test_sample_longer_than_max_length_is_a_one_line_config_error(family_processor, data):
    _, processor = family_processor
    dm, ds = data
    sample = samples(ds)["derma"]
    n = int(ChatBatch(processor, dm.specs)([sample])["attention_mask"].sum())
    assert ChatBatch(processor, dm.specs, max_length=n)([sample])["input_ids"].shape[1] == n  # exactly fits
    with pytest.raises(ConfigError) as err:
        ChatBatch(processor, dm.specs, max_length=n - 1)([sample])
    message = str(err.value)
    assert message.startswith("--model.init_args.vlm_options.max_length: ") and "\n" not in message
    assert f"at least {n}" in message and "dermamnist" in message


def test_processor_without_chat_template_is_a_config_error(tiny_dirs, tmp_path, data):
    """A base (non-chat) checkpoint: the template file is gone, so AutoProcessor loads none."""
    from transformers import AutoProcessor

    target = tmp_path / "base"
    shutil.copytree(tiny_dirs["llava"], target)
    (target / "chat_template.jinja").unlink()
    for name in ("tokenizer_config.json", "processor_config.json"):
        assert "chat_template" not in (target / name).read_text()  # the template lived in chat_template.jinja only
    processor = AutoProcessor.from_pretrained(target)
    assert not processor.chat_template and not processor.tokenizer.chat_template
    with pytest.raises(ConfigError, match="no chat template"):
        ChatBatch(processor, data[0].specs)


def test_template_in_the_tokenizer_only_is_a_config_error(tiny_dirs, tmp_path, data):
    """Older checkpoints keep the template in tokenizer_config.json; the processor's apply_chat_template (which
    places the image) does not use it, so this must be a one-line error, not transformers' traceback mid-epoch."""
    from transformers import AutoProcessor

    target = tmp_path / "tokenizer-template"
    shutil.copytree(tiny_dirs["llava"], target)
    template = (target / "chat_template.jinja").read_text()
    (target / "chat_template.jinja").unlink()
    config = json.loads((target / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    processor = AutoProcessor.from_pretrained(target)
    assert not processor.chat_template and processor.tokenizer.chat_template == template
    with pytest.raises(ValueError, match="processor does not have a chat template"):  # what transformers does
        processor.apply_chat_template(messages("x", "y"), tokenize=False)
    with pytest.raises(ConfigError, match="no chat template"):
        ChatBatch(processor, data[0].specs)


def test_rgb_repeats_gray_and_keeps_colour():
    gray = np.arange(4, dtype=np.uint8).reshape(2, 2, 1)
    assert rgb(gray).shape == (2, 2, 3) and (rgb(gray) == gray).all()
    colour = np.zeros((2, 2, 3), dtype=np.uint8)
    assert rgb(colour) is colour
