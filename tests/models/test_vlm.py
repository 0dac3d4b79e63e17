"""VLM loading, freezing, LoRA placement and the response-only forward, for each of the four families."""

import json
import shutil
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vitask_pl.data.chat import ChatBatch
from vitask_pl.data.collate import IGNORE
from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.errors import ConfigError, MissingFileError, OfflineError
from vitask_pl.losses import response_nll
from vitask_pl.models.families import FAMILY_NAMES
from vitask_pl.models.vitask_model import VITaskModel
from vitask_pl.models.vlm import LoraSettings, build_vlm, freeze_and_add_lora, load_vlm

from ..conftest import sharpen

FLAGS = ["dermamnist", "chestmnist", "pneumoniamnist"]
# Written out here, not read from vitask_pl: where transformers 5 puts each family's parts under model.model.
LANGUAGE = {
    "internvl": "language_model",
    "llava": "language_model",
    "qwen2_vl": "language_model",
    "idefics3": "text_model",
}
VISION = {"internvl": "vision_tower", "llava": "vision_tower", "qwen2_vl": "visual", "idefics3": "vision_model"}
PROJECTOR = {
    "internvl": "multi_modal_projector",
    "llava": "multi_modal_projector",
    "qwen2_vl": "visual.merger",
    "idefics3": "connector",
}
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def loaded(request, tiny_dirs, synth_root):
    """(family, VLM with LoRA, processor, mixed batch of 4 samples: derma, chest x2, pneumonia)."""
    family = request.param
    vlm, processor = build_vlm(tiny_dirs[family], lora=LORA)
    sharpen(vlm.model)
    vlm.eval()
    dm = MedMNISTDataModule(synth_root, FLAGS, 28, num_workers=0)
    ds = dm.dataset("train")
    rows = [0, int(ds.offsets[1]), int(ds.offsets[1]) + 3, int(ds.offsets[2])]
    return family, vlm, processor, ChatBatch(processor, dm.specs)([ds[i] for i in rows])


def hf_inputs(batch: dict) -> dict:
    extra = {"mm_token_type_ids": batch["mm_token_type_ids"]} if "mm_token_type_ids" in batch else {}
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **batch["pixel"], **extra)


def test_response_only_loss_equals_full_forward_loss(loaded):
    family, vlm, _, batch = loaded
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # right padding is part of the test
    with torch.no_grad():
        logits, targets, rows = VITaskModel(vlm).plain(batch)
        ours = response_nll(logits, targets)
        out = vlm.model(**hf_inputs(batch), labels=batch["labels"])

    # Reference: the HF model's full (B, L, V) logits, next-token cross-entropy where labels are set.
    full = out.logits.float()
    shifted = batch["labels"][:, 1:]
    keep = shifted != IGNORE
    reference = F.cross_entropy(full[:, :-1][keep], shifted[keep])
    assert logits.shape == (int(keep.sum()), full.shape[-1])
    assert rows.tolist() == keep.nonzero()[:, 0].tolist()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, out.loss.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, full[:, :-1][keep], rtol=1e-5, atol=1e-4)  # same logits, row for row
    assert float(ours) > 1.0  # a sharpened random model: far from trivially small


def test_gradient_reaches_lora_only(loaded):
    _, vlm, _, batch = loaded
    logits, targets, _ = VITaskModel(vlm).plain(batch)
    response_nll(logits, targets).backward()
    with_grad = {n for n, p in vlm.model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    vlm.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_only_lora_of_the_language_model_trains(family, tiny_dirs):
    vlm, _ = build_vlm(tiny_dirs[family], lora=LORA)
    named = dict(vlm.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    scope = f"model.{LANGUAGE[family]}."
    assert trainable and all(n.startswith(scope) and (".lora_A." in n or ".lora_B." in n) for n in trainable)
    # Every default target of every decoder layer got both factors: 7 linear layers x 2 layers x (A, B).
    assert len(trainable) == 7 * 2 * 2
    assert not any(n.startswith((f"model.{VISION[family]}.", f"model.{PROJECTOR[family]}.")) for n in trainable)
    assert any(n.startswith(f"model.{VISION[family]}.") for n in named)
    assert any(n.startswith(f"model.{PROJECTOR[family]}.") for n in named)
    assert not any("lora_" in n for n in named if not n.startswith(scope))
    assert not vlm.model.get_input_embeddings().weight.requires_grad
    assert not vlm.model.get_output_embeddings().weight.requires_grad
    assert vlm.decoder is getattr(vlm.model.model, LANGUAGE[family])


def test_embed_places_image_features_in_their_slots_and_guards_the_count(loaded):
    _, vlm, _, batch = loaded
    ids = batch["input_ids"]
    with torch.no_grad():
        features = vlm.image_features(batch["pixel"])
        embeds = vlm.embed(ids, features)
        table = vlm.model.get_input_embeddings().weight
    slots = ids == vlm.image_token_id
    assert int(slots.sum()) == len(features) > 0
    assert torch.equal(embeds[slots], features)
    assert torch.equal(embeds[~slots], table[ids[~slots]])
    with pytest.raises(ConfigError, match="image tokens in input_ids but the vision tower gave"):
        vlm.embed(ids, features[:-1])


# --------------------------------------------------------------------------------------------------- bad input
def copy_without(src: str, dst, drop: tuple[str, ...]):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return str(dst)


def test_unsupported_model_type_lists_the_four_families(tiny_dirs, tmp_path):
    """A text-only Llama saved next to a real processor: it loads as a config, then is refused by its type."""
    from transformers import LlamaConfig

    target = copy_without(tiny_dirs["llava"], tmp_path / "llama", ("config.json", "model.safetensors"))
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        target
    )
    with pytest.raises(ConfigError) as err:
        load_vlm(target)
    message = str(err.value)
    assert message.startswith("--model.init_args.vlm: model type 'llama' is not supported")
    for family in FAMILY_NAMES:
        assert family in message


def test_directory_without_processor_files_is_a_missing_file_error(tiny_dirs, tmp_path):
    target = copy_without(
        tiny_dirs["internvl"],
        tmp_path / "bare",
        ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"),
    )
    with pytest.raises(MissingFileError) as err:
        load_vlm(target)
    message = str(err.value)
    assert "processor_config.json" in message and "tokenizer.json" in message and target in message
    assert f"{target} has no processor_config.json" in message  # config.json is there: only the missing are named
    assert not message.startswith("[Errno")


def test_processor_without_image_token_is_a_config_error(tiny_dirs, monkeypatch):
    """No processor or config of the four families lacks an image token (their config classes even refuse None),
    so a loaded pair stands in with both removed."""
    import transformers

    config = SimpleNamespace(model_type="internvl", image_token_id=None)
    processor = transformers.AutoProcessor.from_pretrained(tiny_dirs["internvl"])
    processor.image_token = None
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: config)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: processor)
    with pytest.raises(ConfigError, match="defines no image token"):
        load_vlm(tiny_dirs["internvl"])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_unknown_lora_target_lists_the_real_layer_names(family, tiny_dirs):
    model, _, fam = load_vlm(tiny_dirs[family])
    with pytest.raises(ConfigError) as err:
        freeze_and_add_lora(model, fam, LoraSettings(targets=["nope"]))
    message = str(err.value)
    assert message.startswith("--model.init_args.lora.targets: ['nope'] matches no linear layer")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message
    assert "fc1" not in message and "lm_head" not in message  # vision and head layers are not offered
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_regex_reaching_the_vision_tower_is_refused(family, tiny_dirs):
    model, _, fam = load_vlm(tiny_dirs[family])
    # q_proj in the ViTs of InternVL, LLaVA and Idefics3; Qwen2-VL's vision blocks fuse it into qkv.
    with pytest.raises(ConfigError) as err:
        freeze_and_add_lora(model, fam, LoraSettings(target_regex=r".*\.(q_proj|qkv)"))
    message = str(err.value)
    assert message.startswith("--model.init_args.lora.target_regex:")
    assert f"model.{VISION[family]}." in message and f"model.{LANGUAGE[family]}." in message


def test_lora_regex_inside_the_language_model_is_used(tiny_dirs):
    model, _, fam = load_vlm(tiny_dirs["idefics3"])
    names = freeze_and_add_lora(model, fam, LoraSettings(r=2, alpha=4, target_regex=r"model\.text_model\..*\.v_proj"))
    assert names == [f"model.text_model.layers.{i}.self_attn.v_proj" for i in range(2)]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(".v_proj.lora_" in n for n in trainable)


def test_non_positive_lora_rank_is_a_config_error(tiny_dirs):
    model, _, fam = load_vlm(tiny_dirs["llava"])
    with pytest.raises(ConfigError, match=r"--model.init_args.lora.r: 0 must be positive"):
        freeze_and_add_lora(model, fam, LoraSettings(r=0))


def test_uncached_hub_id_offline_fails_fast_and_suggests_tiny(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OfflineError) as err:
        build_vlm("OpenGVLab/InternVL3-2B-hf", lora=LORA)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "OpenGVLab/InternVL3-2B-hf" in message and "tiny:" in message and "\n" not in message


def test_tiny_spec_resolves_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITASK_CACHE", str(tmp_path))
    vlm, processor = build_vlm("tiny:llava", lora=LORA)
    [built] = (tmp_path / "tiny").glob("llava-28px-*")  # built on first use into $VITASK_CACHE/tiny
    assert json.loads((built / "config.json").read_text())["model_type"] == "llava"
    assert vlm.family.name == "llava" and vlm.image_token_id == processor.image_token_id
    with pytest.raises(ConfigError, match="unknown tiny VLM family 'lava'"):
        build_vlm("tiny:lava", lora=LORA)
