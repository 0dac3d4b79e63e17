"""The VITask stages: fused forward, losses wiring, stage-2 freezing, checkpoints, errors."""

import lightning as L
import pytest
import torch

from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.errors import ConfigError, MissingFileError
from vitask_pl.models.exemplar import insert_slots
from vitask_pl.modules.vitask import ExemplarPromptTuning, RDACRTTuning
from vitask_pl.modules.vlm_parts import fused_views, response_logits

from ..conftest import SMALL_FLAGS, make_tsm_ckpt

FLAGS = ["dermamnist", "chestmnist"]


def stage1(tsm_ckpt, cache_dir, family="internvl", **kw):
    return ExemplarPromptTuning(
        tsm_ckpt=tsm_ckpt, vlm=f"tiny:{family}", datasets=FLAGS, cache_dir=cache_dir, feature_cache=False, **kw
    )


def batch_of(module, synth_root, negatives=False):
    dm = MedMNISTDataModule(synth_root, FLAGS, 28, num_workers=0)
    ds = dm.dataset("train", negatives=negatives)
    return module.collate([ds[i] for i in (0, 3, 60, 61)])


@pytest.mark.parametrize("family", ["internvl", "qwen2_vl"])
def test_views_inside_the_fused_batch_equal_standalone_forwards(family, tsm_ckpt, feature_cache_dir, synth_root):
    module = stage1(tsm_ckpt, feature_cache_dir, family).eval()
    core = module.core
    batch = batch_of(module, synth_root, negatives=True)
    with torch.no_grad():
        exemplars = core.exemplars(batch, "train")
        fused = fused_views(core.vlm, batch, exemplars, core.collate.pad_id, negatives=True)
        plain, targets, _ = response_logits(core.vlm, batch, core.vlm.image_features(batch["pixel"]))
        ep_view = insert_slots(batch, 1, core.vlm.image_token_id, core.collate.pad_id)
        ep, _, _ = response_logits(core.vlm, ep_view, core.vlm.image_features(batch["pixel"]), exemplars.flatten(0, 1))
        neg_batch = {**batch, "pixel": batch["neg_pixel"]}
        neg, _, _ = response_logits(core.vlm, neg_batch, core.vlm.image_features(batch["neg_pixel"]))
    assert torch.equal(fused["targets"], targets)
    assert torch.allclose(fused["plain"], plain, atol=1e-5)
    assert torch.allclose(fused["ep"], ep, atol=1e-5)
    assert torch.allclose(fused["neg"], neg, atol=1e-5)
    assert not torch.allclose(fused["ep"], fused["plain"], atol=1e-6)  # the exemplar reaches the logits
    assert not torch.allclose(fused["neg"], fused["plain"], atol=1e-6)  # so does the other image


def test_stage1_trains_connector_and_lora_only(tsm_ckpt, feature_cache_dir, synth_root):
    module = stage1(tsm_ckpt, feature_cache_dir)
    batch = batch_of(module, synth_root)
    terms = module.core.losses(module, batch, alpha=1.0, beta=0.0, rda_direction="reverse", rda_temperature=1.0)
    assert set(terms) == {"l_van", "l_ep", "l_rda", "loss"}
    terms["loss"].backward()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".connector." in n for n in trainable)
    assert all(module.get_parameter(n).grad is not None for n in trainable if ".connector." in n)


@pytest.fixture(scope="module")
def stage1_ckpt(tsm_ckpt, feature_cache_dir, synth_root, tmp_path_factory):
    """A stage-1 checkpoint after a few real training steps through the Trainer (feature cache on)."""
    out = tmp_path_factory.mktemp("stage1")
    module = ExemplarPromptTuning(tsm_ckpt=tsm_ckpt, vlm="tiny:internvl", datasets=FLAGS, cache_dir=feature_cache_dir)
    dm = MedMNISTDataModule(synth_root, FLAGS, 28, batch_size=4, num_workers=0, max_samples=8)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
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
    module = RDACRTTuning(
        init_from=path,
        tsm_ckpt=tsm_ckpt,
        vlm="tiny:internvl",
        datasets=FLAGS,
        cache_dir=feature_cache_dir,
        feature_cache=False,
    )
    ours, theirs = module.state_dict(), stage1_module.state_dict()
    adapters = [k for k in ours if "lora_" in k or ".connector." in k]
    assert adapters and all(torch.equal(ours[k], theirs[k]) for k in adapters)
    batch = batch_of(module, synth_root, negatives=True)
    terms = module.core.losses(module, batch, **module.loss_weights)
    assert set(terms) == {"l_van", "l_ep", "l_rda", "l_crt", "loss"}
    terms["loss"].backward()
    connector = list(module.core.connector.parameters())
    assert all(not p.requires_grad and p.grad is None for p in connector)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters() if "lora_" in n)
    assert module.needs_negatives and not ExemplarPromptTuning.needs_negatives


def test_missing_checkpoints_name_the_stage_and_the_command(tsm_ckpt, tmp_path):
    with pytest.raises(MissingFileError, match=r"tsm_ckpt is required for stage 1.*configs/tsm.yaml"):
        ExemplarPromptTuning(vlm="tiny:internvl", datasets=FLAGS)
    with pytest.raises(MissingFileError, match=r"init_from is required for stage 2.*configs/ep.yaml"):
        RDACRTTuning(tsm_ckpt=tsm_ckpt, vlm="tiny:internvl", datasets=FLAGS)
    with pytest.raises(
        MissingFileError,
        match=r"tsm_ckpt: .*nope.ckpt not found; produce it with `vitask fit --config configs/tsm.yaml`",
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


def test_plug_in_tsm_of_the_same_width_loads(stage1_ckpt, synth_root, tmp_path, feature_cache_dir):
    other = make_tsm_ckpt(synth_root, SMALL_FLAGS, tmp_path / "other.ckpt", seed=1)
    module = RDACRTTuning(
        init_from=stage1_ckpt[0], tsm_ckpt=other, vlm="tiny:internvl", datasets=FLAGS, cache_dir=feature_cache_dir
    )
    assert module.core.source.tsm_ckpt == other
