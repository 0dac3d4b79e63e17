"""The VITask stages: fused forward, losses wiring, stage-2 freezing, checkpoints, errors."""

import pytest
import torch

from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.errors import ConfigError, MissingFileError
from vitask_pl.modules.vitask import ExemplarPromptTuning, RDACRTTuning

from ..conftest import SMALL_FLAGS, make_tsm_ckpt, quick_trainer

FLAGS = ["dermamnist", "chestmnist"]


def stage1(tsm_ckpt, cache_dir, family="internvl", **kw):
    exemplar = {"cache_dir": cache_dir, "feature_cache": False}
    return ExemplarPromptTuning(tsm_ckpt=tsm_ckpt, vlm=f"tiny:{family}", datasets=FLAGS, exemplar=exemplar, **kw)


def batch_of(module, synth_root, negatives=False):
    dm = MedMNISTDataModule(synth_root, FLAGS, 28, num_workers=0)
    ds = dm.dataset("train", negatives=negatives)
    return module.collate([ds[i] for i in (0, 3, 60, 61)])


@pytest.mark.parametrize("family", ["internvl", "qwen2_vl"])
def test_views_inside_the_fused_batch_equal_standalone_forwards(family, tsm_ckpt, feature_cache_dir, synth_root):
    module = stage1(tsm_ckpt, feature_cache_dir, family).eval()
    model, pad_id = module.model, module.collate.pad_id
    batch = batch_of(module, synth_root, negatives=True)
    with torch.no_grad():
        features = model.source.features(batch, "train")
        fused = model.fused_views(batch, features, pad_id, negatives=True)
        plain, targets, _ = model.plain(batch)
        ep, _, _ = model.ep(batch, features, pad_id)
        neg, _, _ = model.plain(batch, batch["neg_pixel"])
    assert torch.equal(fused["targets"], targets)
    assert torch.allclose(fused["plain"], plain, atol=1e-5)
    assert torch.allclose(fused["ep"], ep, atol=1e-5)
    assert torch.allclose(fused["neg"], neg, atol=1e-5)
    assert not torch.allclose(fused["ep"], fused["plain"], atol=1e-6)  # the exemplar reaches the logits
    assert not torch.allclose(fused["neg"], fused["plain"], atol=1e-6)  # so does the other image


def test_stage1_trains_connector_and_lora_only(tsm_ckpt, feature_cache_dir, synth_root):
    module = stage1(tsm_ckpt, feature_cache_dir)
    batch = batch_of(module, synth_root)
    terms = module.loss_terms(batch)
    assert set(terms) == {"l_van", "l_ep", "l_rda"} and not module.needs_negatives
    module.training_step(batch, 0).backward()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".connector." in n for n in trainable)
    assert all(module.get_parameter(n).grad is not None for n in trainable if ".connector." in n)


@pytest.fixture(scope="module")
def stage1_ckpt(tsm_ckpt, feature_cache_dir, synth_root, tmp_path_factory):
    """A stage-1 checkpoint after a few real training steps through the Trainer (feature cache on)."""
    out = tmp_path_factory.mktemp("stage1")
    exemplar = {"cache_dir": feature_cache_dir}
    module = ExemplarPromptTuning(tsm_ckpt=tsm_ckpt, vlm="tiny:internvl", datasets=FLAGS, exemplar=exemplar)
    dm = MedMNISTDataModule(synth_root, FLAGS, 28, batch_size=4, num_workers=0, max_samples=8)
    trainer = quick_trainer(3, default_root_dir=out, logger=True, enable_checkpointing=True, limit_val_batches=1)
    trainer.fit(module, dm)
    trainer.save_checkpoint(out / "stage1.ckpt")
    return str(out / "stage1.ckpt"), module


def test_stage_checkpoint_holds_adapters_only(stage1_ckpt):
    path, module = stage1_ckpt
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all("lora_" in k or ".connector." in k for k in state)
    assert any(".connector." in k for k in state)
    assert "optimizer_states" in torch.load(path, map_location="cpu", weights_only=True)


def test_stage2_starts_from_stage1_and_freezes_the_connector(stage1_ckpt, tsm_ckpt, feature_cache_dir, synth_root):
    path, stage1_module = stage1_ckpt

    def stage2(**objective):
        exemplar = {"cache_dir": feature_cache_dir, "feature_cache": False}
        return RDACRTTuning(
            init_from=path, tsm_ckpt=tsm_ckpt, vlm="tiny:internvl", datasets=FLAGS, exemplar=exemplar, **objective
        )

    module = stage2()
    ours, theirs = module.state_dict(), stage1_module.state_dict()
    adapters = [k for k in ours if "lora_" in k or ".connector." in k]
    assert adapters and all(torch.equal(ours[k], theirs[k]) for k in adapters)
    batch = batch_of(module, synth_root, negatives=True)
    terms = module.loss_terms(batch)
    assert set(terms) == {"l_van", "l_ep", "l_rda", "l_crt"}
    module.training_step(batch, 0).backward()
    connector = list(module.model.connector.parameters())
    assert all(not p.requires_grad and p.grad is None for p in connector)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters() if "lora_" in n)
    assert module.needs_negatives
    # beta 0 (the "RDA only" row): no CRT term, so negatives are neither loaded nor encoded
    rda_only = stage2(objective={"beta": 0.0})
    assert not rda_only.needs_negatives and "l_crt" not in rda_only.loss_terms(batch_of(rda_only, synth_root))


def test_missing_checkpoints_name_the_stage_and_the_command(tsm_ckpt, tmp_path):
    with pytest.raises(MissingFileError, match=r"tsm_ckpt is required for stage 1.*configs/tsm.yaml"):
        ExemplarPromptTuning(vlm="tiny:internvl", datasets=FLAGS)
    with pytest.raises(MissingFileError, match=r"init_from is required for stage 2.*configs/ep.yaml"):
        RDACRTTuning(tsm_ckpt=tsm_ckpt, vlm="tiny:internvl", datasets=FLAGS)
    with pytest.raises(
        MissingFileError,
        match=r"tsm_ckpt: .*nope.ckpt not found; produce it with `vitask fit --config configs/tsm.yaml \[--config",
    ):
        ExemplarPromptTuning(tsm_ckpt=str(tmp_path / "nope.ckpt"), vlm="tiny:internvl", datasets=FLAGS)


def test_tsm_mismatches_are_clear(tsm_ckpt, stage1_ckpt, synth_root, tmp_path):
    with pytest.raises(ConfigError, match=r"was trained on \[.*\], not on \['bloodmnist'\]"):
        ExemplarPromptTuning(tsm_ckpt=tsm_ckpt, vlm="tiny:internvl", datasets=["dermamnist", "bloodmnist"])
    wider = make_tsm_ckpt(synth_root, SMALL_FLAGS, tmp_path / "wide.ckpt", embed_dim=48)
    with pytest.raises(
        ConfigError,
        match=r"init_from: .* differs in tsm_width: it holds .*tsm_width 32.*this run builds .*tsm_width 48",
    ):
        RDACRTTuning(init_from=stage1_ckpt[0], tsm_ckpt=wider, vlm="tiny:internvl", datasets=FLAGS)


def test_plug_in_tsm_of_the_same_width_loads(stage1_ckpt, tsm_ckpt, synth_root, tmp_path, feature_cache_dir):
    """VITask^plug: another TSM of the same width feeds the stage-1 connector; its features, not the old TSM's."""
    other = make_tsm_ckpt(synth_root, SMALL_FLAGS, tmp_path / "other.ckpt", seed=1)
    exemplar = {"cache_dir": feature_cache_dir, "feature_cache": False}
    built = {
        name: RDACRTTuning(
            init_from=stage1_ckpt[0], tsm_ckpt=path, vlm="tiny:internvl", datasets=FLAGS, exemplar=exemplar
        )
        for name, path in (("plugged", other), ("original", tsm_ckpt))
    }
    plugged, original = built["plugged"], built["original"]
    batch = batch_of(plugged, synth_root)
    adapters = [k for k in plugged.state_dict() if "lora_" in k or ".connector." in k]
    assert adapters and all(torch.equal(plugged.state_dict()[k], original.state_dict()[k]) for k in adapters)
    features = {name: m.model.source.features(batch, "train") for name, m in built.items()}
    assert features["plugged"].shape == features["original"].shape
    assert not torch.allclose(features["plugged"], features["original"])
