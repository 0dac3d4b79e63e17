"""`vitask export`: a stage checkpoint's LoRA (PEFT format), connector and merged model reproduce the trained
module's predictions outside vitask; bad inputs are one line and write nothing."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor

from vitask_pl.data.catalog import dataset_specs
from vitask_pl.data.chat import ChatBatch
from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.errors import ConfigError
from vitask_pl.eval.protocols import candidate_loglik, encode_prefix
from vitask_pl.export import export, read_checkpoint
from vitask_pl.models.exemplar import TSMConnector, insert_slots
from vitask_pl.models.families import family_of
from vitask_pl.models.tsm import load_tsm
from vitask_pl.models.vlm import VLM, LoraSettings
from vitask_pl.modules.vanilla import VanillaInstructionTuning
from vitask_pl.modules.vitask import ExemplarPromptTuning
from vitask_pl.stages import STAGES

from .conftest import quick_trainer, run, sharpen

FLAGS = ["dermamnist", "chestmnist"]
LORA = LoraSettings(r=4, alpha=8, dropout=0.1)  # not the defaults: the export must read them from the checkpoint


def dotted(module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def sharp_base(src: str, dst) -> str:
    """A copy of a tiny model whose outputs depend strongly on every input (a random tiny model is near uniform)."""
    from transformers import AutoModelForImageTextToText

    shutil.copytree(src, dst)
    model = AutoModelForImageTextToText.from_pretrained(dst)
    sharpen(model)
    model.save_pretrained(dst)
    return str(dst)


def fit_and_save(module, synth_root, out) -> str:
    """Two training steps through the Trainer, LoRA B redrawn large (so LoRA matters), then the stage checkpoint."""
    dm = MedMNISTDataModule(synth_root, FLAGS, 28, batch_size=4, num_workers=0, max_samples=8)
    trainer = quick_trainer(2, default_root_dir=out)
    trainer.fit(module, dm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    trainer.save_checkpoint(out / "stage.ckpt")
    return str(out / "stage.ckpt")


def samples(synth_root) -> list[dict]:
    ds = MedMNISTDataModule(synth_root, FLAGS, 28, num_workers=0).dataset("test")
    return [ds[i] for i in (0, 1, len(ds) - 2, len(ds) - 1)]  # both datasets


def score(vlm: VLM, batch: dict, exemplars: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, C)`` candidate log-likelihoods, the ``score`` protocol."""
    prefix = encode_prefix(vlm, batch, exemplars)
    return candidate_loglik(vlm, prefix, batch["cand_ids"], batch["cand_mask"])


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, batch: dict, atol: float, rtol: float = 0.0) -> None:
    assert torch.allclose(ours, theirs, rtol=rtol, atol=atol), (ours - theirs).abs().max()
    masked = [x.masked_fill(~batch["cand_valid"], float("-inf")) for x in (ours, theirs)]
    assert torch.equal(masked[0].argmax(1), masked[1].argmax(1))


def exported_vlm(model, out) -> VLM:
    """A loaded transformers model seen as a :class:`VLM`, with the image token of the exported processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return VLM(model.eval(), family_of(model.config.model_type), image_token_id)


def load_export(out, batch: dict, plain: torch.Tensor):
    """(PEFT-loaded VLM, merged VLM) of an export; checks the base alone predicts differently (LoRA matters)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    meta = json.loads((out / "vitask_export.json").read_text())
    base = AutoModelForImageTextToText.from_pretrained(meta["base"])
    assert not torch.allclose(score(exported_vlm(base, out), batch), plain, atol=1e-2)  # not a vacuous round trip
    peft = PeftModel.from_pretrained(base, out)
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")
    return exported_vlm(peft.get_base_model(), out), exported_vlm(merged, out)


def check_adapter(out, state: dict, prefix: str) -> None:
    """The PEFT files hold every LoRA tensor of the checkpoint, with its settings, and no B entry is zero."""
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (LORA.r, LORA.alpha, LORA.dropout)
    assert all(".language_model." in name for name in config["target_modules"])
    adapter = load_file(out / "adapter_model.safetensors")
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert len(adapter) == len(lora)
    for key, value in adapter.items():  # PEFT: base_model.model.<path>.lora_A.weight
        path = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        assert torch.equal(value, lora[prefix + path]), key
    assert all(v.abs().min() > 0 for k, v in adapter.items() if ".lora_B." in k)


@pytest.fixture(scope="module")
def vanilla_ckpt(tiny_dirs, synth_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-vanilla")
    base = sharp_base(tiny_dirs["internvl"], root / "base")
    module = VanillaInstructionTuning(
        vlm=base, datasets=FLAGS, lora=LORA, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)
    )
    return fit_and_save(module, synth_root, root), module.eval()


def test_vanilla_round_trip_through_peft_and_merged(vanilla_ckpt, synth_root, tmp_path, capsys):
    path, module = vanilla_ckpt
    out = tmp_path / "export"
    code, stdout, err = run(["export", path, "--out", str(out), "--merge"], capsys)
    assert code == 0, err
    assert f"to {out}" in stdout
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    check_adapter(out, state, "model.vlm.model.")
    assert not (out / "connector.safetensors").exists() and not (out / "connector.json").exists()
    meta = json.loads((out / "vitask_export.json").read_text())
    assert meta["module"] == STAGES["vanilla"].module == dotted(module) and meta["vlm"] == module.hparams.vlm
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == meta["base"]
    assert "sha256" in (out / "README.md").read_text()

    batch = module.collate(samples(synth_root))
    exported = ChatBatch(AutoProcessor.from_pretrained(out), dataset_specs(FLAGS))(samples(synth_root))
    assert torch.equal(exported["input_ids"], batch["input_ids"])  # the exported processor is the training one
    with torch.no_grad():
        ours = score(module.model.vlm, batch)
        peft, merged = load_export(out, batch, ours)
        assert_same(score(peft, batch), ours, batch, atol=1e-5)
        assert_same(score(merged, batch), ours, batch, atol=1e-4, rtol=1e-6)  # merging rounds differently


@pytest.mark.parametrize("family", ["internvl", "qwen2_vl"])
def test_stage1_round_trip_with_connector(family, tiny_dirs, tsm_ckpt, synth_root, tmp_path):
    base = sharp_base(tiny_dirs[family], tmp_path / "base")
    module = ExemplarPromptTuning(
        tsm_ckpt=tsm_ckpt,
        vlm=base,
        datasets=FLAGS,
        lora=LORA,
        exemplar={"tokens": 2, "feature_cache": False},
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    path = fit_and_save(module, synth_root, tmp_path)
    module.eval()
    out = export(path, out=str(tmp_path / "export"), merge=True)

    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    check_adapter(out, state, "model.vlm.model.")
    assert json.loads((out / "vitask_export.json").read_text())["module"] == STAGES["ep"].module == dotted(module)
    config = json.loads((out / "connector.json").read_text())
    assert config["init_args"] == {"feature_dim": 32, "hidden_dim": module.model.vlm.hidden_size, "num_tokens": 2}
    assert (config["tsm_ckpt"], config["datasets"], config["image_size"]) == (tsm_ckpt, FLAGS, 28)
    tensors = load_file(out / "connector.safetensors")
    assert tensors.keys() == module.model.connector.state_dict().keys()
    assert all(torch.equal(v, state[f"model.connector.{k}"]) for k, v in tensors.items())
    connector = TSMConnector(**config["init_args"])
    connector.load_state_dict(tensors)

    model = module.model
    batch = module.collate(samples(synth_root))
    with torch.no_grad():
        exemplars = model.exemplars(model.source.features(batch, "test"))
        ep = insert_slots(batch, 2, model.vlm.image_token_id, module.collate.pad_id)
        ours = {"wo_ep": score(model.vlm, batch), "w_ep": score(model.vlm, ep, exemplars.flatten(0, 1))}
        assert not torch.allclose(ours["w_ep"], ours["wo_ep"], atol=1e-2)  # the connector reaches the predictions
        tsm, _ = load_tsm(config["tsm_ckpt"])
        theirs_exemplars = connector(tsm.features(batch["images"], config["feature_kind"]))
        assert torch.equal(theirs_exemplars, exemplars)
        peft, merged = load_export(out, batch, ours["wo_ep"])
        for vlm, atol, rtol in ((peft, 1e-5, 0.0), (merged, 1e-4, 1e-6)):
            assert_same(score(vlm, batch), ours["wo_ep"], batch, atol, rtol)
            assert_same(score(vlm, ep, theirs_exemplars.flatten(0, 1)), ours["w_ep"], batch, atol, rtol)


def test_the_module_class_comes_from_the_checkpoint_record(vanilla_ckpt, tmp_path):
    checkpoint = torch.load(vanilla_ckpt[0], map_location="cpu", weights_only=True)
    assert read_checkpoint(vanilla_ckpt[0])[1] == STAGES["vanilla"].module == checkpoint["vitask"]["module"]
    del checkpoint["vitask"]
    torch.save(checkpoint, tmp_path / "unrecorded.ckpt")
    with pytest.raises(ConfigError, match="CKPT: .*unrecorded.ckpt is not a vitask checkpoint"):
        read_checkpoint(str(tmp_path / "unrecorded.ckpt"))


def test_a_lora_tensor_without_a_place_or_a_layer_without_one_is_an_error(vanilla_ckpt, tmp_path):
    checkpoint = torch.load(vanilla_ckpt[0], map_location="cpu", weights_only=True)
    lora = sorted(k for k in checkpoint["state_dict"] if "lora_" in k)
    extra = {
        **checkpoint,
        "state_dict": {**checkpoint["state_dict"], lora[0].replace("layers.0.", "layers.7."): torch.ones(1)},
    }
    less = {**checkpoint, "state_dict": {k: v for k, v in checkpoint["state_dict"].items() if k != lora[0]}}
    for name, broken, message in (
        ("extra", extra, "has no place; 1 unused, 0 missing"),
        ("less", less, "0 unused, 1 missing"),
    ):
        torch.save(broken, tmp_path / f"{name}.ckpt")
        with pytest.raises(ConfigError, match=f"does not fit the base .*{message}"):
            export(str(tmp_path / f"{name}.ckpt"), out=str(tmp_path / name))
        assert not (tmp_path / name).exists()


def error_line(argv: list[str], capsys) -> str:
    """The one ``error:`` line `vitask argv` prints, exiting with status 2."""
    code, _, err = run(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_existing_out_is_kept_without_force_and_replaced_with_it(vanilla_ckpt, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = error_line(["export", vanilla_ckpt[0], "--out", str(out)], capsys)
    assert f"--out: {out} already exists" in line and "--force" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]

    code, _, err = run(["export", vanilla_ckpt[0], "--out", str(out), "--force"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "merged").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary sibling left behind


def test_a_crash_midway_leaves_out_as_it_was(vanilla_ckpt, tmp_path, monkeypatch):
    import vitask_pl.export

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(vitask_pl.export, "_readme", boom)  # after the adapter files are written
    with pytest.raises(RuntimeError, match="boom"):
        export(vanilla_ckpt[0], out=str(tmp_path / "new"))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="boom"):
        export(vanilla_ckpt[0], out=str(tmp_path / "old"), force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and [p.name for p in (tmp_path / "old").iterdir()] == [
        "keep.txt"
    ]


def test_wrong_checkpoints_are_one_line(tsm_ckpt, vanilla_ckpt, tmp_path, capsys):
    out = str(tmp_path / "export")
    line = error_line(["export", tsm_ckpt, "--out", out], capsys)
    assert f"CKPT: {tsm_ckpt} is a TSM-stage checkpoint" in line and "vitask fit" in line
    line = error_line(["export", str(tmp_path / "nope.ckpt"), "--out", out], capsys)
    assert "CKPT:" in line and "nope.ckpt not found" in line and "vitask fit" in line
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    line = error_line(["export", str(tmp_path / "notes.txt"), "--out", out], capsys)
    assert "notes.txt cannot be read as a checkpoint" in line
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    inside = shutil.copy(vanilla_ckpt[0], run_dir / "checkpoints")
    line = error_line(["export", str(inside), "--out", str(run_dir), "--force"], capsys)
    assert (
        "--out:" in line and "which --force would delete" in line and (run_dir / "checkpoints" / "stage.ckpt").is_file()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]
