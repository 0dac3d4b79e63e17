"""Stage 2 (RDA + CRT) under DDP on two CPU processes (gloo), for tests/modules/test_ddp.py.

Launched by torchrun, so Lightning finds its ranks in the environment instead of re-running pytest:
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/modules/ddp_stage2.py --root R --tsm T \
        --init STAGE1.ckpt --cache DIR --out DIR
The strategy is built from configs/strategy/ddp.yaml, so the shipped preset is what trains. Each rank writes
``rank{r}.pt``: its trainable weights and connector after training, its losses, the samples it trained on and
the validation accuracy it logged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["dermamnist", "chestmnist"]


class Record(Callback):
    """Each training step's loss and the (dataset, row) of each sample this rank trained on."""

    def __init__(self):
        self.losses: list[float] = []
        self.samples: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.samples += list(zip(batch["dataset"].tolist(), batch["index"].tolist()))


def main() -> None:
    from vitask_pl.data.datamodule import MedMNISTDataModule
    from vitask_pl.modules.vitask import RDACRTTuning

    parser = argparse.ArgumentParser()
    for name in ("root", "tsm", "init", "cache", "out"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()

    preset = yaml.safe_load((ROOT / "configs/strategy/ddp.yaml").read_text())["trainer"]["strategy"]
    assert preset["class_path"].endswith("DDPStrategy"), preset
    L.seed_everything(0)
    module = RDACRTTuning(
        init_from=args.init, tsm_ckpt=args.tsm, vlm="tiny:internvl", datasets=FLAGS, exemplar={"cache_dir": args.cache}
    )
    # 16 samples per dataset: 32 per epoch, 16 per rank, 4 steps of 4; validation (one batch) closes the epoch.
    dm = MedMNISTDataModule(args.root, FLAGS, 28, batch_size=4, num_workers=0, max_samples=16)
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(**preset.get("init_args", {})),
        max_epochs=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(module, dm)
    torch.save(
        {
            "world_size": trainer.world_size,
            "trainable": {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad},
            "connector": {k: v.clone() for k, v in module.model.connector.state_dict().items()},
            "losses": record.losses,
            "samples": record.samples,
            "val_acc": float(trainer.callback_metrics["val/avg/acc"]),
        },
        Path(args.out) / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
