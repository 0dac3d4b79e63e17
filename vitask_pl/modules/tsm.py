"""Stage 0: train the task-specific model jointly over the selected datasets (docs/method.md#tsm)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from vitask_pl.data.catalog import dataset_specs, joint_width, resolve_flags
from vitask_pl.data.collate import ImageBatch
from vitask_pl.eval.metrics import PerDatasetMetrics
from vitask_pl.eval.results import flatten, publish
from vitask_pl.fingerprint import check_resume, stamp
from vitask_pl.losses import joint_classification_loss
from vitask_pl.models.tsm import TaskSpecificModel
from vitask_pl.modules.optim import configure_optimizers


def joint_probabilities(logits: torch.Tensor, class_mask: torch.Tensor, multi_label: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` logits -> probabilities: softmax within each sample's dataset block, sigmoid for multi-label.
    Columns outside the block are 0."""
    logits = logits.float()
    soft = logits.masked_fill(~class_mask, float("-inf")).softmax(dim=1)
    sig = torch.sigmoid(logits) * class_mask
    return torch.where(multi_label[:, None], sig, soft)


class TSMModule(L.LightningModule):
    """A timm backbone with one joint head over the selected datasets' label space.

    Args:
        backbone: timm model name (``resnet18``, ``vit_base_patch16_224.augreg_in21k``, ...).
        pretrained: start from timm's pretrained weights.
        backbone_kwargs: extra ``timm.create_model`` arguments (``patch_size`` for a ViT at 28 px, ...).
        datasets: linked from ``--data.datasets``; defines the joint head and the per-dataset masks.
        cards: linked from ``--data.datasets`` and ``--data.root``: the cards of imported datasets among them.
        image_size: linked from ``--data.size``; fixed-size backbones are built for it.
        optimizer: injected optimizer (AdamW by default).
        scheduler: injected LR scheduler; ``None`` means linear warmup then cosine decay per step.
        warmup_ratio: warmup fraction of all optimizer steps for the default schedule.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool = False,
        backbone_kwargs: dict | None = None,
        datasets: list[str] | None = None,
        cards: dict[str, dict] | None = None,
        image_size: int = 28,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.05,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.specs = dataset_specs(
            resolve_flags(datasets or "all", option="--model.init_args.datasets", cards=cards), cards
        )
        self.tsm = TaskSpecificModel(
            backbone, pretrained=pretrained, image_size=image_size, backbone_kwargs=backbone_kwargs
        )
        self.head = nn.Linear(self.tsm.num_features, joint_width(self.specs))
        masks = torch.zeros(len(self.specs), joint_width(self.specs), dtype=torch.bool)
        for d, s in enumerate(self.specs):
            masks[d, s.offset : s.offset + s.num_classes] = True
        self.register_buffer("class_masks", masks, persistent=False)
        self.register_buffer("multi_label", torch.tensor([s.multi_label for s in self.specs]), persistent=False)
        self.optimizer, self.scheduler, self.warmup_ratio = optimizer, scheduler, warmup_ratio
        self.collate = ImageBatch(self.specs)
        self.val_metrics, self.test_metrics = PerDatasetMetrics(self.specs), PerDatasetMetrics(self.specs)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "connect"):
            datamodule.connect(self.collate)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> joint logits ``(B, K)``."""
        return self.head(self.tsm(images))

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["images"])
        d = batch["dataset"]
        loss = joint_classification_loss(logits, batch["targets"], self.class_masks[d], self.multi_label[d])
        return loss, joint_probabilities(logits, self.class_masks[d], self.multi_label[d])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["dataset"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, probs = self._step(batch)
        self.log("val/loss", loss, sync_dist=True, batch_size=len(batch["dataset"]))
        self.val_metrics.update(probs, batch["targets"], batch["dataset"])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        _, probs = self._step(batch)
        self.test_metrics.update(probs, batch["targets"], batch["dataset"])

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        _, probs = self._step(batch)
        return {"dataset": batch["dataset"], "index": batch["index"], "probs": probs, "targets": batch["targets"]}

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute()
        self.val_metrics.reset()
        logged = flatten(results, "val")
        self.log("val/avg/acc", logged.pop("val/avg/acc"), prog_bar=True)  # the checkpoint monitor
        self.log_dict(logged)

    def on_test_epoch_end(self) -> None:
        results = self.test_metrics.compute()
        self.test_metrics.reset()
        self.log_dict(flatten(results, "test"))
        publish(self.trainer, results)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        stamp(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_resume(self, checkpoint)

    def configure_optimizers(self):
        return configure_optimizers(self, self.parameters(), self.optimizer, self.scheduler, self.warmup_ratio)
