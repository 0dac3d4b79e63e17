"""The paper's baseline: vanilla visual instruction tuning, ``L_van`` only, same LoRA setup as VITask."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from vitask_pl.data.catalog import dataset_specs, resolve_flags
from vitask_pl.data.chat import ChatBatch
from vitask_pl.fingerprint import check_resume, stamp
from vitask_pl.losses import response_nll
from vitask_pl.models.vlm import LoraSettings, build_vlm
from vitask_pl.modules.optim import configure_optimizers
from vitask_pl.modules.vlm_parts import (
    Evaluation,
    check_protocols,
    keep_adapters,
    log_test,
    log_validation,
    plain_hparams,
    predict_rows,
    response_logits,
    token_denominator,
    write_stage_predictions,
)

DEFAULT_VLM = "OpenGVLab/InternVL3-2B-hf"  # HF-native (no remote code) InternVL closest to the paper's InternVL2-2B: InternViT-300M + Qwen2.5-1.5B


class VanillaInstructionTuning(L.LightningModule):
    """LoRA instruction tuning of a VLM on the VITask prompts with next-token loss on the response.

    Args:
        vlm: hub id, local directory (``save_pretrained``), or ``tiny:<family>`` for an offline tiny model.
        datasets: linked from ``--data.datasets``.
        image_size: linked from ``--data.size`` (tiny models are built for it).
        lora: LoRA rank, alpha, dropout and target layers (language model only).
        dtype: weights dtype of the frozen base (``float32``, ``bfloat16``, ``auto``).
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
        gradient_checkpointing: trade compute for activation memory.
        trust_remote_code: allow remote code in the checkpoint (off: the four families are native).
        max_length: longest tokenized sample allowed; longer ones are an error, never truncated.
        processor_kwargs: extra keyword arguments for every processor call.
        val_protocols: protocols run at validation (``score`` is cheap; ``generate`` decodes).
        test_protocols: protocols run at test.
        max_new_tokens: decoding budget of ``generate`` (label names are a few tokens).
        optimizer: injected optimizer (AdamW by default).
        scheduler: injected scheduler; ``None``: linear warmup then cosine decay per step.
        warmup_ratio: warmup fraction of the default schedule.
    """

    modes = ("wo_ep",)

    def __init__(
        self,
        vlm: str = DEFAULT_VLM,
        datasets: list[str] | None = None,
        image_size: int = 28,
        lora: LoraSettings | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        max_length: int = 2048,
        processor_kwargs: dict | None = None,
        val_protocols: list[str] | None = None,
        test_protocols: list[str] | None = None,
        max_new_tokens: int = 24,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.03,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        plain_hparams(self)
        self.specs = dataset_specs(resolve_flags(datasets or "all", option="--model.init_args.datasets"))
        self.val_protocols = check_protocols(val_protocols or ["score"], "--model.init_args.val_protocols")
        self.test_protocols = check_protocols(
            test_protocols or ["score", "generate"], "--model.init_args.test_protocols"
        )
        self.vlm, self.processor = build_vlm(
            vlm,
            lora=lora or LoraSettings(),
            image_size=image_size,
            dtype=dtype,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code,
        )
        self.collate = ChatBatch(self.processor, self.specs, max_length=max_length, processor_kwargs=processor_kwargs)
        self.evaluation = Evaluation(
            self.specs, self.modes, max_new_tokens=max_new_tokens, stop_ids=self.collate.stop_ids
        )
        self.optimizer, self.scheduler, self.warmup_ratio = optimizer, scheduler, warmup_ratio
        self.strict_loading = False  # checkpoints hold the adapters only; the base comes from `vlm`

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, targets, _ = response_logits(self.vlm, batch, self.vlm.image_features(batch["pixel"]))
        loss = response_nll(logits, targets, num_tokens=token_denominator(self, len(targets), logits.device))
        self.log("train/l_van", loss, prog_bar=True, batch_size=len(batch["dataset"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation.update(self.vlm, batch, "val", "wo_ep", self.val_protocols, self.collate.tokenizer)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation.update(self.vlm, batch, "test", "wo_ep", self.test_protocols, self.collate.tokenizer)

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        probs = self.evaluation.update(self.vlm, batch, "test", "wo_ep", ["score"], self.collate.tokenizer)
        self._predictions.extend(predict_rows(self.specs, batch, {"wo_ep": probs}))

    def on_predict_epoch_start(self) -> None:
        self._predictions: list[dict] = []

    def on_predict_epoch_end(self) -> None:
        write_stage_predictions(self, self._predictions)

    def on_validation_epoch_end(self) -> None:
        log_validation(self, self.evaluation.compute("val"), self.val_protocols[0])

    def on_test_epoch_end(self) -> None:
        log_test(self, self.evaluation.compute("test"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_adapters(checkpoint)
        stamp(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_resume(self, checkpoint)

    def configure_optimizers(self):
        return configure_optimizers(self, self.parameters(), self.optimizer, self.scheduler, self.warmup_ratio)
