"""The VITask stages (docs/method.md#overview).

Stage 1, :class:`ExemplarPromptTuning`: ``L_van + L_EP + alpha * L_RDA``; trains LoRA and the TSM connector.
Stage 2, :class:`RDACRTTuning`: ``L_van + L_EP + alpha * L_RDA + beta * L_CRT``; trains LoRA, connector frozen,
starting from stage 1's weights. Both run the EP, plain (and negative) views as one fused batch and report
validation/test results with the TSM (``w_ep``) and without it (``wo_ep``, the deployment setting).
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from vitask_pl.errors import ConfigError
from vitask_pl.fingerprint import check, load
from vitask_pl.models.vitask_model import is_adapter
from vitask_pl.models.vlm import LoraSettings
from vitask_pl.modules.exemplar_source import require
from vitask_pl.modules.settings import CRTObjective, EvalSettings, ExemplarSettings, Objective, VLMOptions, as_settings
from vitask_pl.modules.vlm_stage import DEFAULT_VLM, VLMStage, init_args
from vitask_pl.stages import STAGES


class ExemplarPromptTuning(VLMStage):
    """Stage 1, exemplar prompting: ``L_van + L_EP + alpha * L_RDA``; trains LoRA and the TSM connector.

    Args:
        tsm_ckpt: checkpoint of the TSM stage (required).
        vlm: hub id, local directory, or ``tiny:<family>``.
        datasets: linked from ``--data.datasets``.
        cards: linked from ``--data.datasets`` and ``--data.root``: the cards of imported datasets among them.
        image_size: linked from ``--data.size``.
        lora: LoRA settings (language model only).
        exemplar: exemplar tokens, feature kind and feature cache.
        objective: loss weights and the RDA direction and temperature.
        vlm_options: how the VLM is loaded and fed (dtype, attention, checkpointing, max length).
        evaluation: validation and test protocols.
        optimizer: injected optimizer.
        scheduler: injected scheduler (``None``: warmup + cosine).
        warmup_ratio: warmup share of the default schedule.
    """

    def __init__(
        self,
        tsm_ckpt: str | None = None,
        vlm: str = DEFAULT_VLM,
        datasets: list[str] | None = None,
        cards: dict[str, dict] | None = None,
        image_size: int = 28,
        lora: LoraSettings | None = None,
        exemplar: ExemplarSettings | None = None,
        objective: Objective | None = None,
        vlm_options: VLMOptions | None = None,
        evaluation: EvalSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.03,
    ):
        objective = as_settings(Objective, objective)
        objective.check()
        super().__init__(**init_args(locals()))


class RDACRTTuning(VLMStage):
    """Stage 2, joint RDA + CRT: ``L_van + L_EP + alpha * L_RDA + beta * L_CRT``; trains LoRA, connector frozen.

    Starts from stage 1's LoRA and connector (``init_from``). Negative images (same dataset, different label)
    come from the data module when ``beta > 0``.

    Args:
        tsm_ckpt: checkpoint of the TSM stage (required).
        init_from: stage-1 checkpoint (required).
        vlm: hub id, local directory, or ``tiny:<family>``.
        datasets: linked from ``--data.datasets``.
        cards: linked from ``--data.datasets`` and ``--data.root``: the cards of imported datasets among them.
        image_size: linked from ``--data.size``.
        lora: LoRA settings (language model only).
        exemplar: exemplar tokens, feature kind and feature cache (as stage 1's).
        objective: loss weights; ``beta: 0`` is the paper's "RDA only" row and ``alpha: 0`` "CRT only".
        vlm_options: how the VLM is loaded and fed (dtype, attention, checkpointing, max length).
        evaluation: validation and test protocols.
        optimizer: injected optimizer.
        scheduler: injected scheduler (``None``: warmup + cosine).
        warmup_ratio: warmup share of the default schedule.
    """

    def __init__(
        self,
        tsm_ckpt: str | None = None,
        init_from: str | None = None,
        vlm: str = DEFAULT_VLM,
        datasets: list[str] | None = None,
        cards: dict[str, dict] | None = None,
        image_size: int = 28,
        lora: LoraSettings | None = None,
        exemplar: ExemplarSettings | None = None,
        objective: CRTObjective | None = None,
        vlm_options: VLMOptions | None = None,
        evaluation: EvalSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.03,
    ):
        # before the VLM loads; tsm_ckpt is the shared VLMStage's to require
        require(init_from, "--model.init_args.init_from", STAGES["rda_crt"].title, STAGES["ep"].command)
        objective = as_settings(CRTObjective, objective)
        objective.check()
        super().__init__(**init_args(locals()))
        _load_init(self, init_from)
        self.model.connector.requires_grad_(False)  # stage 2 trains LoRA only; the connector keeps stage 1's mapping


def _load_init(module: VLMStage, path: str) -> None:
    """Stage 2 starts from stage 1's adapters (LoRA + connector)."""
    produced_by = f"`{STAGES['ep'].command} --model.init_args.tsm_ckpt TSM.ckpt`"
    checkpoint = load(path, "--model.init_args.init_from", produced_by)
    check(checkpoint, module, path=path, option="--model.init_args.init_from", stages=(STAGES["ep"].class_name,))
    state = checkpoint.get("state_dict", {})
    adapters = [k for k in module.state_dict() if is_adapter(k)]
    missing = [k for k in adapters if k not in state]
    if missing:
        raise ConfigError(
            f"--model.init_args.init_from: {path} is not a stage-1 checkpoint of this model "
            f"(no {missing[0]}); produce it with {produced_by}."
        )
    module.load_state_dict({k: state[k] for k in adapters}, strict=False)
