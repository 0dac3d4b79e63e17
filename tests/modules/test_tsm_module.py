import json

import lightning as L
import torch

from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.models.tsm import extract_features, load_tsm
from vitask_pl.modules.tsm import TSMModule, joint_probabilities

from ..conftest import SMALL_FLAGS


def tiny_tsm(flags):
    return TSMModule(
        "vit_tiny_patch16_224",
        backbone_kwargs={"patch_size": 7, "depth": 1, "embed_dim": 32, "num_heads": 2},
        datasets=flags,
        image_size=28,
    )


def test_joint_probabilities_stay_inside_each_dataset_block():
    mask = torch.tensor([[True, True, False, False], [False, False, True, True]])
    probs = joint_probabilities(torch.randn(2, 4), mask, torch.tensor([False, True]))
    assert torch.allclose(probs[0, :2].sum(), torch.tensor(1.0)) and torch.all(probs[0, 2:] == 0)
    assert torch.all(probs[1, :2] == 0) and torch.all((probs[1, 2:] > 0) & (probs[1, 2:] < 1))


def test_fit_and_test_write_metrics_and_a_loadable_checkpoint(synth_root, tmp_path):
    dm = MedMNISTDataModule(synth_root, SMALL_FLAGS, 28, batch_size=16, num_workers=0)
    model = tiny_tsm(dm.flags)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, dm)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("tsm.backbone") for k in changed) and "head.weight" in changed
    trainer.test(model, dm)
    metrics = json.loads((tmp_path / "lightning_logs/version_0/metrics.json").read_text())
    assert set(metrics) == {*SMALL_FLAGS, "avg"}
    assert all({"acc", "f1", "auc", "n"} <= set(m) for m in metrics.values())
    assert "exact_match" in metrics["chestmnist"]

    ckpt = tmp_path / "tsm.ckpt"
    trainer.save_checkpoint(ckpt)
    tsm, hp = load_tsm(str(ckpt))
    assert hp["datasets"] == SMALL_FLAGS and not any(p.requires_grad for p in tsm.parameters())
    loader = dm.loader("test", model.collate)
    a, b = extract_features(tsm, loader), extract_features(tsm, loader)
    assert torch.equal(a["features"], b["features"])  # deterministic: eval transform, eval mode
    model.eval()
    batch = next(iter(loader))
    assert torch.allclose(a["features"][: len(batch["index"])], model.tsm(batch["images"]), atol=1e-5)
