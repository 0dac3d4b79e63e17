"""Score and generate protocols against naive references: one plain HF forward per (sample, candidate), and
transformers' own ``generate``; then answer parsing and candidate probabilities."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitask_pl.data.catalog import FLAGS as FLAGS_ALL
from vitask_pl.data.catalog import dataset_specs
from vitask_pl.data.chat import ChatBatch, messages, rgb
from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.data.prompts import candidate_responses
from vitask_pl.eval.parsing import normalise, parse_answer
from vitask_pl.eval.protocols import (
    candidate_loglik,
    encode_prefix,
    generation_to_probs,
    greedy_generate,
    score_to_probs,
)
from vitask_pl.models.families import FAMILY_NAMES
from vitask_pl.models.tiny import build_tiny_vlm
from vitask_pl.models.vlm import LoraSettings, build_vlm

from ..conftest import sharpen

FLAGS = ["dermamnist", "chestmnist", "pneumoniamnist"]
# Written out, not read from the code under test: the token each family's chat template ends a turn with.
END_OF_TURN = {"internvl": "<|im_end|>", "llava": "</s>", "qwen2_vl": "<|im_end|>", "idefics3": "<end_of_utterance>"}


@pytest.fixture(scope="module")
def samples(synth_root):
    """A mixed test batch: derma, two chest (multi-label), pneumonia: three prompt lengths, 7/15/2 candidates."""
    dm = MedMNISTDataModule(synth_root, FLAGS, 28, num_workers=0)
    ds = dm.dataset("test")
    rows = [0, int(ds.offsets[1]), int(ds.offsets[1]) + 1, int(ds.offsets[2])]
    return dm.specs, [ds[i] for i in rows]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def model(request, tmp_path_factory, samples):
    family = request.param
    path = build_tiny_vlm(family, str(tmp_path_factory.mktemp("tiny") / family))
    vlm, processor = build_vlm(path, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    sharpen(vlm.model)
    vlm.eval()
    specs, rows = samples
    collate = ChatBatch(processor, specs)
    return family, vlm, processor, collate, collate(rows)


def naive_loglik(vlm, processor, eot: int, sample: dict, response: str) -> tuple[float, list[int]]:
    """Sum of log p(candidate token) from one plain HF forward over the whole conversation; and those tokens."""
    image = Image.fromarray(rgb(sample["image"]))
    prompt = processor.apply_chat_template(messages(sample["instruction"]), tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(messages(sample["instruction"], response), tokenize=False)
    n_prompt = processor(text=prompt, images=[image], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=full, images=[image], return_tensors="pt")
    with torch.no_grad():
        logp = F.log_softmax(vlm.model(**inputs).logits[0].float(), dim=-1)
    ids = inputs["input_ids"][0].tolist()
    tokens = ids[n_prompt : ids.index(eot, n_prompt) + 1]  # response + end of turn
    return sum(float(logp[n_prompt - 1 + t, tok]) for t, tok in enumerate(tokens)), tokens


def test_candidate_scores_equal_a_naive_forward_per_candidate(model, samples):
    family, vlm, processor, _, batch = model
    specs, rows = samples
    eot = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    scores = candidate_loglik(vlm, encode_prefix(vlm, batch), batch["cand_ids"], batch["cand_mask"])
    assert scores.shape == batch["cand_valid"].shape == (4, 15)

    checked = 0
    for r, sample in enumerate(rows):
        responses = candidate_responses(specs[sample["dataset"]])
        assert int(batch["cand_valid"][r].sum()) == len(responses)
        reference = []
        for c, response in enumerate(responses):
            value, tokens = naive_loglik(vlm, processor, eot, sample, response)
            assert batch["cand_ids"][r, c][batch["cand_mask"][r, c].bool()].tolist() == tokens
            reference.append(value)
            checked += 1
        torch.testing.assert_close(scores[r, : len(responses)], torch.tensor(reference), rtol=1e-5, atol=1e-4)
        assert torch.tensor(reference).std() > 0.5  # candidates really differ: the comparison can tell them apart
    assert checked == 7 + 15 + 15 + 2


def test_scoring_twice_from_fresh_prefixes_is_deterministic(model):
    """The cache is expanded in place for the candidates; a second prefix must not see the first one's state."""
    _, vlm, _, _, batch = model
    first = candidate_loglik(vlm, encode_prefix(vlm, batch), batch["cand_ids"], batch["cand_mask"])
    second = candidate_loglik(vlm, encode_prefix(vlm, batch), batch["cand_ids"], batch["cand_mask"])
    assert torch.equal(first, second)


def hf_greedy(vlm, processor, sample: dict, k: int) -> list[int]:
    image = Image.fromarray(rgb(sample["image"]))
    prompt = processor.apply_chat_template(messages(sample["instruction"]), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    with torch.no_grad():
        out = vlm.model.generate(**inputs, do_sample=False, max_new_tokens=k)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def cut(tokens: list[int], stop: set[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stop), tokens)


def test_greedy_generate_equals_transformers_generate(model, samples):
    family, vlm, processor, collate, batch = model
    _, rows = samples
    k = 8
    reference = [hf_greedy(vlm, processor, s, k) for s in rows]
    assert vlm.model.generation_config.eos_token_id in collate.stop_ids  # HF stops where we stop
    stop = set(collate.stop_ids)
    ours = greedy_generate(vlm, encode_prefix(vlm, batch), k, collate.stop_ids)
    assert ours == [cut(ref, stop) for ref in reference]
    assert max(len(t) for t in ours) == k  # at least one row ran the full budget

    # One row hitting a stop token early must not cut the others: stop at row 0's third token as well.
    early = stop | {reference[0][2]}
    ours = greedy_generate(vlm, encode_prefix(vlm, batch), k, sorted(early))
    assert ours == [cut(ref, early) for ref in reference]
    assert len(ours[0]) == 2


# ----------------------------------------------------------------------------------------------------- parsing
SPECS = {s.flag: s for s in dataset_specs(["breastmnist", "tissuemnist", "chestmnist", "dermamnist"])}


def onehot(n: int, *on: int) -> list[float]:
    return [1.0 if i in on else 0.0 for i in range(n)]


@pytest.mark.parametrize(
    ("flag", "text", "expected"),
    [
        ("breastmnist", "normal, benign", onehot(2, 1)),
        ("breastmnist", "  Normal,   Benign. ", onehot(2, 1)),
        ("breastmnist", "malignant", onehot(2, 0)),
        ("tissuemnist", "Collecting Duct, Connecting Tubule", onehot(8, 0)),
        ("tissuemnist", "collecting duct, connecting tubule.\n", onehot(8, 0)),
        ("dermamnist", "MELANOMA", onehot(7, 4)),
        ("dermamnist", '"melanoma"', onehot(7, 4)),
        ("chestmnist", "cardiomegaly, effusion", onehot(14, 1, 2)),
        ("chestmnist", "Effusion , Cardiomegaly.", onehot(14, 1, 2)),
        ("chestmnist", "hernia", onehot(14, 13)),
        ("chestmnist", "no finding", onehot(14)),
        ("chestmnist", "No finding.", onehot(14)),
    ],
)
def test_parse_answer_matches_labels(flag, text, expected):
    pred = parse_answer(text, SPECS[flag])
    assert pred is not None and pred.tolist() == expected


@pytest.mark.parametrize(
    ("flag", "text"),
    [
        ("breastmnist", "normal"),  # half of a label that contains a comma
        ("breastmnist", "benign"),
        ("breastmnist", "normal, benign, malignant"),
        ("tissuemnist", "Collecting Duct"),
        ("dermamnist", "melanoma, melanocytic nevi"),  # one class only for single-label
        ("dermamnist", "the answer is melanoma"),
        ("dermamnist", ""),
        ("chestmnist", "cardiomegaly, pizza"),  # every part must be a finding
        ("chestmnist", "cardiomegaly and effusion"),
        ("chestmnist", "no finding, effusion"),
        ("chestmnist", ""),
        ("chestmnist", ","),
    ],
)
def test_parse_answer_rejects_anything_else(flag, text):
    assert parse_answer(text, SPECS[flag]) is None


def test_label_names_survive_normalisation():
    """Every MedMNIST label parses back to its own class (no two labels collapse into one after normalising)."""
    for spec in dataset_specs(FLAGS_ALL):
        names = [normalise(n) for n in spec.labels]
        assert len(set(names)) == len(names), spec.flag
        for c, name in enumerate(spec.labels):
            assert parse_answer(name, spec).tolist() == onehot(spec.num_classes, c), (spec.flag, name)


def test_generation_to_probs_places_answers_in_their_block():
    specs = dataset_specs(["dermamnist", "chestmnist"])
    probs, invalid = generation_to_probs(
        ["melanoma", "effusion, hernia", "no idea", "no finding"], torch.tensor([0, 1, 1, 1]), specs
    )
    assert invalid.tolist() == [False, False, True, False]
    expected = torch.zeros(4, 7 + 14)
    expected[0, 4] = 1
    expected[1, 7 + 2] = expected[1, 7 + 13] = 1
    assert torch.equal(probs, expected)


# ------------------------------------------------------------------------------------------------ probabilities
def test_score_to_probs_softmaxes_over_valid_candidates_in_each_block():
    specs = dataset_specs(["dermamnist", "chestmnist", "pneumoniamnist"])  # 7, 14 (+ no finding), 2
    g = torch.Generator().manual_seed(0)
    loglik = torch.randn(4, 15, generator=g) * 5 - 20
    valid = torch.zeros(4, 15, dtype=torch.bool)
    valid[0, :7] = valid[1, :15] = valid[2, :2] = valid[3, :7] = True
    loglik[~valid] = 100.0  # padding candidates score high: they must not take any probability
    dataset = torch.tensor([0, 1, 2, 0])
    probs = score_to_probs(loglik, valid, dataset, specs)
    assert probs.shape == (4, 7 + 14 + 2)

    blocks = {0: (0, 7), 1: (7, 21), 2: (21, 23)}
    for row, d in enumerate(dataset.tolist()):
        n_cand = len(candidate_responses(specs[d]))
        weights = [math.exp(float(v)) for v in loglik[row, :n_cand]]
        expected = [w / sum(weights) for w in weights]
        lo, hi = blocks[d]
        torch.testing.assert_close(probs[row, lo:hi], torch.tensor(expected[: hi - lo]), rtol=1e-5, atol=1e-7)
        outside = torch.cat([probs[row, :lo], probs[row, hi:]])
        assert (outside == 0).all()
        if not specs[d].multi_label:
            torch.testing.assert_close(probs[row, lo:hi].sum(), torch.tensor(1.0))
    # Chest: the 14 findings share what "no finding" leaves.
    torch.testing.assert_close(probs[1, 7:21].sum(), torch.tensor(1 - expected_no_finding(loglik[1])))


def expected_no_finding(row: torch.Tensor) -> float:
    weights = [math.exp(float(v)) for v in row[:15]]
    return weights[14] / sum(weights)
