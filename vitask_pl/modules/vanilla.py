"""The paper's baseline: vanilla visual instruction tuning, ``L_van`` only, same LoRA setup as VITask."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from vitask_pl.models.vlm import LoraSettings
from vitask_pl.modules.settings import EvalSettings, VLMOptions
from vitask_pl.modules.vlm_stage import DEFAULT_VLM, VLMStage, init_args


class VanillaInstructionTuning(VLMStage):
    """LoRA instruction tuning of a VLM on the VITask prompts with next-token loss on the response.

    Args:
        vlm: hub id, local directory (``save_pretrained``), or ``tiny:<family>`` for an offline tiny model.
        datasets: linked from ``--data.datasets``.
        cards: linked from ``--data.datasets`` and ``--data.root``: the cards of imported datasets among them.
        image_size: linked from ``--data.size`` (tiny models are built for it).
        lora: LoRA rank, alpha, dropout and target layers (language model only).
        vlm_options: how the VLM is loaded and fed (dtype, attention, checkpointing, max length).
        evaluation: validation and test protocols.
        optimizer: injected optimizer (AdamW by default).
        scheduler: injected scheduler; ``None``: linear warmup then cosine decay per step.
        warmup_ratio: warmup fraction of the default schedule.
    """

    def __init__(
        self,
        vlm: str = DEFAULT_VLM,
        datasets: list[str] | None = None,
        cards: dict[str, dict] | None = None,
        image_size: int = 28,
        lora: LoraSettings | None = None,
        vlm_options: VLMOptions | None = None,
        evaluation: EvalSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.03,
    ):
        super().__init__(**init_args(locals()))
