"""The VITask stages (README, "Method decisions").

Stage 1, :class:`ExemplarPromptTuning`: ``L_van + L_EP + alpha * L_RDA``; trains LoRA and the TSM connector.
Stage 2, :class:`RDACRTTuning`: ``L_van + L_EP + alpha * L_RDA + beta * L_CRT``; trains LoRA, connector frozen,
starting from stage 1's weights. Both run the EP, plain (and negative) views as one fused batch and report
validation/test results with the TSM (``w_ep``) and without it (``wo_ep``, the deployment setting).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from vitask_pl.data.catalog import dataset_specs, resolve_flags
from vitask_pl.data.chat import ChatBatch
from vitask_pl.errors import ConfigError
from vitask_pl.fingerprint import check, check_resume, load, stamp
from vitask_pl.losses import crt, rda_kl, response_nll
from vitask_pl.models.exemplar import TSMConnector, insert_slots
from vitask_pl.models.vlm import LoraSettings, build_vlm
from vitask_pl.modules.exemplar_source import ExemplarSource, require
from vitask_pl.modules.optim import configure_optimizers
from vitask_pl.modules.vanilla import DEFAULT_VLM
from vitask_pl.modules.vlm_parts import (
    Evaluation,
    check_protocols,
    fused_views,
    is_adapter,
    keep_adapters,
    log_test,
    log_validation,
    plain_hparams,
    predict_rows,
    token_denominator,
    write_stage_predictions,
)

MODES = ("wo_ep", "w_ep")
TSM_COMMAND = "vitask fit --config configs/tsm.yaml [--config configs/offline/tsm.yaml]"
STAGE1_COMMAND = (
    "vitask fit --config configs/ep.yaml [--config configs/offline/ep.yaml] --model.init_args.tsm_ckpt TSM.ckpt"
)
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class VITaskCore(nn.Module):
    """What both stages hold: the LoRA'd VLM, the frozen TSM as exemplar source, the connector, evaluation."""

    def __init__(
        self,
        *,
        stage: str,
        tsm_ckpt,
        vlm,
        datasets,
        image_size,
        lora,
        exemplar_tokens,
        feature_kind,
        feature_cache,
        cache_dir,
        dtype,
        attn_implementation,
        gradient_checkpointing,
        trust_remote_code,
        max_length,
        processor_kwargs,
        val_protocols,
        test_protocols,
        max_new_tokens,
    ):
        super().__init__()
        self.specs = dataset_specs(resolve_flags(datasets or "all", option="--model.init_args.datasets"))
        tsm_ckpt = require(tsm_ckpt, "--model.init_args.tsm_ckpt", stage, TSM_COMMAND)
        if exemplar_tokens < 1 or (feature_kind == "patch" and exemplar_tokens != 1):
            raise ConfigError(
                f"--model.init_args.exemplar_tokens: {exemplar_tokens}; use >= 1 with pooled features "
                f"and 1 with patch features (one exemplar token per patch)."
            )
        self.val_protocols = check_protocols(val_protocols or ["score"], "--model.init_args.val_protocols")
        self.test_protocols = check_protocols(
            test_protocols or ["score", "generate"], "--model.init_args.test_protocols"
        )
        self.source = ExemplarSource(
            tsm_ckpt, self.specs, image_size, kind=feature_kind, cache=feature_cache, cache_dir=cache_dir
        )
        self.vlm, processor = build_vlm(
            vlm,
            lora=lora or LoraSettings(),
            image_size=image_size,
            dtype=dtype,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code,
        )
        self.connector = TSMConnector(self.source.width, self.vlm.hidden_size, exemplar_tokens)
        self.collate = ChatBatch(
            processor,
            self.specs,
            max_length=max_length,
            processor_kwargs=processor_kwargs,
            with_images=not feature_cache,
        )
        self.evaluation = Evaluation(self.specs, MODES, max_new_tokens=max_new_tokens, stop_ids=self.collate.stop_ids)

    def exemplars(self, batch: dict, split: str) -> torch.Tensor:
        """``(B, K, D)`` exemplar embeddings: connector(frozen TSM feature)."""
        dtype = self.vlm.model.get_input_embeddings().weight.dtype
        return self.connector(self.source.features(batch, split).to(self.connector.net[1].weight.dtype)).to(dtype)

    def losses(
        self,
        module: L.LightningModule,
        batch: dict,
        *,
        alpha: float,
        beta: float,
        rda_direction: str,
        rda_temperature: float,
    ) -> dict[str, torch.Tensor]:
        views = fused_views(self.vlm, batch, self.exemplars(batch, "train"), self.collate.pad_id, negatives=beta > 0)
        targets = views["targets"]
        n = token_denominator(module, len(targets), targets.device)
        terms = {
            "l_van": response_nll(views["plain"], targets, num_tokens=n),
            "l_ep": response_nll(views["ep"], targets, num_tokens=n),
            "l_rda": rda_kl(
                views["plain"], views["ep"], direction=rda_direction, temperature=rda_temperature, num_tokens=n
            ),
        }
        if beta > 0:
            terms["l_crt"] = crt(views["plain"], views["neg"], targets, num_tokens=n)
        terms["loss"] = terms["l_van"] + terms["l_ep"] + alpha * terms["l_rda"] + beta * terms.get("l_crt", 0.0)
        return terms

    def evaluate(self, batch: dict, split: str, protocols) -> dict:
        """Both modes: the VLM alone and the VLM with the exemplar; ``{mode: {protocol: (B, K) probs}}``."""
        tok = self.collate.tokenizer
        out = {"wo_ep": self.evaluation.update(self.vlm, batch, split, "wo_ep", protocols, tok)}
        ep = insert_slots(
            batch,
            self.connector.num_tokens if self.source.kind == "pooled" else self.source.features(batch, split).shape[1],
            self.vlm.image_token_id,
            self.collate.pad_id,
        )
        exemplars = self.exemplars(batch, split)
        out["w_ep"] = self.evaluation.update(
            self.vlm, ep, split, "w_ep", protocols, tok, exemplars.reshape(-1, exemplars.shape[-1])
        )
        return out


def _setup_features(module: L.LightningModule, core: VITaskCore, stage: str) -> None:
    """Build/load the feature cache for this stage's splits: rank 0 builds, the others then read."""
    datamodule = module.trainer.datamodule
    if core.source.cache is None:
        return
    if datamodule is None or not hasattr(datamodule, "root"):
        raise ConfigError(
            "--model.init_args.feature_cache: the cache reads a MedMNISTDataModule's files; pass "
            "feature_cache: false to run the TSM on each batch instead."
        )
    splits = _STAGE_SPLITS.get(stage, ("train", "val", "test"))
    if module.trainer.is_global_zero:
        # setup() runs before the strategy moves the model, so the TSM is still on the CPU: extract on the
        # accelerator (the strategy would move it there next anyway), or a paper-size build takes hours and the
        # other ranks' barrier times out (30 min). Tables stay on module.device, the CPU in a first setup.
        core.source.tsm.to(module.trainer.strategy.root_device)
        core.source.prepare(datamodule.root, splits, module.device)
    module.trainer.strategy.barrier()
    core.source.prepare(datamodule.root, splits, module.device)


def _load_init(module: L.LightningModule, path: str) -> None:
    """Stage 2 starts from stage 1's adapters (LoRA + connector)."""
    checkpoint = load(path, "--model.init_args.init_from", f"`{STAGE1_COMMAND}`")
    check(checkpoint, module, path=path, option="--model.init_args.init_from", stages=("ExemplarPromptTuning",))
    state = checkpoint.get("state_dict", {})
    ours = module.state_dict()
    adapters = [k for k in ours if is_adapter(k)]
    missing = [k for k in adapters if k not in state]
    if missing:
        raise ConfigError(
            f"--model.init_args.init_from: {path} is not a stage-1 checkpoint of this model "
            f"(no {missing[0]}); produce it with `{STAGE1_COMMAND}`."
        )
    module.load_state_dict({k: state[k] for k in adapters}, strict=False)


def check_loss_weights(**weights: float) -> None:
    for name, value in weights.items():
        if not value >= 0:
            raise ConfigError(
                f"--model.init_args.{name}: {value}; loss weights must be >= 0 (0 switches the term off)."
            )


class ExemplarPromptTuning(L.LightningModule):
    """Stage 1, exemplar prompting: ``L_van + L_EP + alpha * L_RDA``; trains LoRA and the TSM connector.

    Args:
        tsm_ckpt: checkpoint of the TSM stage (required).
        vlm: hub id, local directory, or ``tiny:<family>``.
        datasets: linked from ``--data.datasets``.
        image_size: linked from ``--data.size``.
        lora: LoRA settings (language model only).
        exemplar_tokens: exemplar tokens per image from the pooled feature.
        feature_kind: ``pooled`` (CLS / pooled feature) or ``patch`` (one token per patch, the paper's EP_all).
        feature_cache: look TSM features up in a per-split cache (the TSM stays out of the step).
        cache_dir: where the cache lives (default ``~/.cache/vitask/features``).
        alpha: weight of ``L_RDA``.
        rda_direction: ``reverse`` KL(plain || EP) as in the paper, or ``forward``.
        rda_temperature: softmax temperature of the RDA KL.
        dtype: frozen base dtype. attn_implementation: ``sdpa`` etc. gradient_checkpointing: save memory.
        trust_remote_code: allow remote code. max_length: longest sample (never truncated).
        processor_kwargs: extra processor call arguments.
        val_protocols: protocols at validation. test_protocols: protocols at test. max_new_tokens: ``generate`` budget.
        optimizer: injected optimizer. scheduler: injected scheduler (``None``: warmup + cosine). warmup_ratio: warmup share.
    """

    needs_negatives = False

    def __init__(
        self,
        tsm_ckpt: str | None = None,
        vlm: str = DEFAULT_VLM,
        datasets: list[str] | None = None,
        image_size: int = 28,
        lora: LoraSettings | None = None,
        exemplar_tokens: int = 1,
        feature_kind: str = "pooled",
        feature_cache: bool = True,
        cache_dir: str | None = None,
        alpha: float = 1.0,
        rda_direction: str = "reverse",
        rda_temperature: float = 1.0,
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
        check_loss_weights(alpha=alpha)
        if rda_direction not in ("reverse", "forward"):
            raise ConfigError(
                f"--model.init_args.rda_direction: {rda_direction!r}; use 'reverse' (the paper's) or 'forward'."
            )
        if not rda_temperature > 0:
            raise ConfigError(
                f"--model.init_args.rda_temperature: {rda_temperature}; use a temperature > 0 (1 is the paper's)."
            )
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        plain_hparams(self)
        given = dict(locals())  # outside the comprehension: there, locals() is the comprehension's own scope
        loss_args = (
            "self",
            "__class__",
            "alpha",
            "rda_direction",
            "rda_temperature",
            "optimizer",
            "scheduler",
            "warmup_ratio",
        )
        core_args = {k: v for k, v in given.items() if k not in loss_args}
        self.core = VITaskCore(stage="stage 1 (EP fine-tuning)", **core_args)
        self.collate = self.core.collate
        self.loss_weights = {
            "alpha": alpha,
            "beta": 0.0,
            "rda_direction": rda_direction,
            "rda_temperature": rda_temperature,
        }
        self.optimizer, self.scheduler, self.warmup_ratio = optimizer, scheduler, warmup_ratio
        self.strict_loading = False  # checkpoints hold LoRA + connector; the base comes from `vlm`

    def setup(self, stage: str) -> None:
        _setup_features(self, self.core, stage)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.core.losses(self, batch, **self.loss_weights)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=True, batch_size=len(batch["dataset"]))
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.core.evaluate(batch, "val", self.core.val_protocols)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.core.evaluate(batch, "test", self.core.test_protocols)

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        self._predictions.extend(predict_rows(self.core.specs, batch, self.core.evaluate(batch, "test", ["score"])))

    def on_predict_epoch_start(self) -> None:
        self._predictions: list[dict] = []

    def on_predict_epoch_end(self) -> None:
        write_stage_predictions(self, self._predictions)

    def on_validation_epoch_end(self) -> None:
        log_validation(self, self.core.evaluation.compute("val"), self.core.val_protocols[0])

    def on_test_epoch_end(self) -> None:
        log_test(self, self.core.evaluation.compute("test"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_adapters(checkpoint)
        stamp(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # DeepSpeed hands this hook only its client state (weights restored by itself); the record is in it
        check_resume(self, checkpoint)

    def configure_optimizers(self):
        return configure_optimizers(self, self.parameters(), self.optimizer, self.scheduler, self.warmup_ratio)


class RDACRTTuning(ExemplarPromptTuning):
    """Stage 2, joint RDA + CRT: ``L_van + L_EP + alpha * L_RDA + beta * L_CRT``; trains LoRA, connector frozen.

    Starts from stage 1's LoRA and connector (``init_from``). Negative images (same dataset, different label)
    come from the data module. Subclassing stage 1 is deliberate: stage 2 *is* stage 1 plus CRT and a frozen
    connector, and one level of reuse reads better than a copy of every hook.

    Args:
        init_from: stage-1 checkpoint (required).
        beta: weight of ``L_CRT``; ``beta: 0`` with ``alpha > 0`` is the paper's "RDA only" ablation row, and
            ``alpha: 0`` the "CRT only" row.
        **kwargs: every argument of :class:`ExemplarPromptTuning`.
    """

    needs_negatives = True

    def __init__(self, init_from: str | None = None, beta: float = 1.0, **kwargs):
        stage = "stage 2 (RDA+CRT)"
        require(kwargs.get("tsm_ckpt"), "--model.init_args.tsm_ckpt", stage, TSM_COMMAND)
        require(init_from, "--model.init_args.init_from", stage, STAGE1_COMMAND)
        check_loss_weights(beta=beta)
        super().__init__(**kwargs)  # jsonargparse reads the parent's parameters through **kwargs
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        plain_hparams(self)
        self.loss_weights["beta"] = beta
        _load_init(self, init_from)
        self.core.connector.requires_grad_(False)  # stage 2 trains LoRA only; the connector keeps stage 1's mapping
