"""Vanilla instruction tuning end to end, per family: `vitask tiny-vlm`, `vitask fit`, `vitask test` in-process,
then the LightningModule directly: what trains, what stays frozen, what the checkpoint holds and reloads."""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from vitask_pl.cli import main
from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.models.families import FAMILY_NAMES
from vitask_pl.models.vlm import LoraSettings
from vitask_pl.modules.vanilla import VanillaInstructionTuning

from ..conftest import quick_trainer, run, stage_configs

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["dermamnist", "chestmnist"]
# Checkpoints of every family must hold the adapters only. Idefics3 names its own (frozen) vision->text projector
# `connector`, which keep_adapters' "connector." marker (meant for the TSM connector) also keeps.


def common_args(model_dir, root_dir, synth_root) -> list[str]:
    return [
        *stage_configs("vanilla"),
        "--model.init_args.vlm",
        str(model_dir),
        "--trainer.default_root_dir",
        str(root_dir),
        "--trainer.max_epochs",
        "1",
        "--data.root",
        str(synth_root),
        "--data.datasets",
        f"[{','.join(FLAGS)}]",
        "--data.max_samples",
        "8",
        "--data.num_workers",
        "0",
        "--trainer.enable_progress_bar",
        "false",
    ]


def cli(argv: list[str]) -> int:
    """Exit code of `vitask argv` run in this process (for module fixtures, where capsys is not available)."""
    try:
        main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def fitted(request, tmp_path_factory, synth_root):
    """(family, tiny model dir, run dir, CLI args) after `vitask tiny-vlm` and `vitask fit`, once per family."""
    family = request.param
    base = tmp_path_factory.mktemp(f"vanilla-{family}")
    model_dir, run_dir = base / "model", base / "run"
    assert cli(["tiny-vlm", "--family", family, "--out", str(model_dir)]) == 0
    common = common_args(model_dir, run_dir, synth_root)
    assert cli(["fit", *common]) == 0
    return family, model_dir, run_dir, common


@pytest.mark.slow
def test_cli_fits_and_tests(fitted, capsys):
    family, model_dir, run_dir, common = fitted
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == family
    checkpoints = {p.name for p in run_dir.rglob("*.ckpt")}
    assert "last.ckpt" in checkpoints and any(n.startswith("best-") for n in checkpoints)

    ckpt = next(run_dir.rglob("last.ckpt"))
    code, out, err = run(["test", *common, "--ckpt_path", str(ckpt)], capsys)
    assert code == 0, err
    written = list(run_dir.rglob("metrics.json"))
    assert len(written) == 1 and f"metrics written to {written[0]}" in out
    metrics = json.loads(written[0].read_text())
    assert set(metrics) == {"wo_ep"} and set(metrics["wo_ep"]) == {"score", "generate"}
    score, generate = metrics["wo_ep"]["score"], metrics["wo_ep"]["generate"]
    assert set(score) == set(generate) == {*FLAGS, "avg"}
    for flag in FLAGS:
        assert {"acc", "f1", "auc", "n"} <= set(score[flag]) and score[flag]["n"] == 8
        assert {"acc", "f1", "invalid", "n"} <= set(generate[flag]) and "auc" not in generate[flag]
        assert generate[flag]["n"] == 8
    # The score protocol's ACC against an independent count over `vitask predict`'s rows (prediction == label)
    code, out, err = run(["predict", *common, "--ckpt_path", str(ckpt)], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(next(run_dir.rglob("predictions.csv")))))
    single = [f for f in FLAGS if f != "chestmnist"]  # multi-label ACC is per finding, not one row's match
    for flag in single:
        mine = [r["prediction"] == r["label"] for r in rows if r["dataset"] == flag]
        assert len(mine) == 8 and score[flag]["acc"] == pytest.approx(sum(mine) / len(mine))
    assert {"acc", "f1", "auc"} <= set(score["avg"]) and score["avg"]["n"] == 16
    for name in ("acc", "f1", "auc"):
        assert score["avg"][name] == pytest.approx(sum(score[f][name] for f in FLAGS) / 2)
    assert "exact_match" in score["chestmnist"]


def lora_names(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_checkpoint_holds_adapters_only_and_reloads(fitted, synth_root, tmp_path):
    family, model_dir, run_dir, _ = fitted
    ckpt = next(run_dir.rglob("last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]

    fresh = VanillaInstructionTuning(vlm=str(model_dir), datasets=FLAGS, lora=LoraSettings(r=8, alpha=16, dropout=0.0))
    trainable = lora_names(fresh)
    assert trainable <= set(state)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    dm = MedMNISTDataModule(synth_root, FLAGS, 28, batch_size=16, num_workers=0, max_samples=4)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.test(fresh, datamodule=dm, ckpt_path=str(ckpt), verbose=False)
    after = fresh.state_dict()
    for key, value in after.items():
        # strict_loading is off (the base comes from `vlm`), so a key mismatch would load nothing, silently.
        assert torch.equal(value, state[key] if key in state else before[key]), key
    assert any(not torch.equal(state[k], before[k]) for k in trainable)  # trained adapters: loading mattered

    extra = sorted(set(state) - trainable)
    assert not extra  # LoRA tensors only: no vision, projector or LLM base weights


@pytest.mark.slow
def test_module_trains_lora_and_leaves_the_base_bit_identical(fitted, synth_root, tmp_path):
    family, model_dir, _, _ = fitted
    module = VanillaInstructionTuning(
        vlm=str(model_dir),
        datasets=FLAGS,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainable = lora_names(module)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    dm = MedMNISTDataModule(synth_root, FLAGS, 28, batch_size=4, num_workers=0, max_samples=8)
    trainer = quick_trainer(3, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert trainer.global_step == 3
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for n, p in module.named_parameters() if n in trainable}

    after = module.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == trainable  # every LoRA factor moved; every frozen tensor (and buffer) is bit-identical
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/l_van"])))
