"""The one LightningModule of every VLM stage: vanilla IT, stage 1 (EP) and stage 2 (RDA+CRT).

The stages differ in their loss terms and in whether an exemplar source is attached, not in their hooks, so the
hooks are written once here. The classes that configs name (:mod:`vitask_pl.modules.vanilla`,
:mod:`vitask_pl.modules.vitask`) are thin: an explicit signature (what ``--help`` and jsonargparse read) and
what is theirs alone. Nothing here knows which of them it is beyond :func:`vitask_pl.stages.stage_of`.
"""

from __future__ import annotations

import dataclasses

import lightning as L
import torch

from vitask_pl.data.catalog import dataset_specs, resolve_flags
from vitask_pl.data.chat import ChatBatch
from vitask_pl.errors import ConfigError
from vitask_pl.fingerprint import check_resume, stamp
from vitask_pl.losses import crt, rda_kl, response_nll
from vitask_pl.models.exemplar import insert_slots
from vitask_pl.models.vitask_model import VITaskModel, is_adapter
from vitask_pl.models.vlm import LoraSettings, build_vlm
from vitask_pl.modules.evaluation import (
    Evaluation,
    class_probabilities,
    log_test,
    log_validation,
    predict_rows,
    write_stage_predictions,
)
from vitask_pl.modules.exemplar_source import ExemplarSource, require
from vitask_pl.modules.optim import configure_optimizers
from vitask_pl.modules.settings import EvalSettings, ExemplarSettings, Objective, VLMOptions, as_settings
from vitask_pl.stages import STAGES, stage_of

DEFAULT_VLM = "OpenGVLab/InternVL3-2B-hf"  # HF-native (no remote code) InternVL closest to the paper's InternVL2-2B
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class VLMStage(L.LightningModule):
    """A LoRA'd VLM trained on the VITask prompts; with ``exemplar`` settings, VITask's exemplar source too.

    Built only through the stage classes, whose docstrings document each argument (``--help`` prints them);
    ``tsm_ckpt``, ``exemplar`` and ``objective`` are the VITask stages' and stay ``None`` for vanilla IT.
    """

    def __init__(
        self,
        *,
        vlm: str,
        datasets: list[str] | None,
        cards: dict[str, dict] | None,
        image_size: int,
        lora: LoraSettings | None,
        vlm_options: VLMOptions | None,
        evaluation: EvalSettings | None,
        optimizer,
        scheduler,
        warmup_ratio: float,
        tsm_ckpt: str | None = None,
        exemplar: ExemplarSettings | None = None,
        objective: Objective | None = None,
    ):
        super().__init__()
        self.stage = stage_of(self)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        _plain_hparams(self)
        self.specs = dataset_specs(
            resolve_flags(datasets or "all", option="--model.init_args.datasets", cards=cards), cards
        )
        options = self.vlm_options = as_settings(VLMOptions, vlm_options)
        options.check()
        self.eval_settings = as_settings(EvalSettings, evaluation)
        self.eval_settings.check()
        source = None
        if "tsm_ckpt" in self.stage.needs:
            tsm_ckpt = require(tsm_ckpt, "--model.init_args.tsm_ckpt", self.stage.title, STAGES["tsm"].command)
            exemplar = as_settings(ExemplarSettings, exemplar)
            exemplar.check()
            source = ExemplarSource(
                tsm_ckpt,
                self.specs,
                image_size,
                kind=exemplar.feature_kind,
                cache=exemplar.feature_cache,
                cache_dir=exemplar.cache_dir,
            )
        self.objective = objective
        vlm_model, processor = build_vlm(
            vlm,
            lora=lora or LoraSettings(),
            image_size=image_size,
            dtype=options.dtype,
            attn_implementation=options.attn_implementation,
            gradient_checkpointing=options.gradient_checkpointing,
            trust_remote_code=options.trust_remote_code,
        )
        self.model = VITaskModel(vlm_model, source, exemplar.tokens if source is not None else 1)
        self.collate = ChatBatch(
            processor,
            self.specs,
            max_length=options.max_length,
            processor_kwargs=options.processor_kwargs,
            with_images=source is not None and not exemplar.feature_cache,  # the TSM runs in the step
        )
        self.modes = ("wo_ep", "w_ep") if source is not None else ("wo_ep",)
        self.evaluation = Evaluation(
            self.specs, self.modes, max_new_tokens=self.eval_settings.max_new_tokens, stop_ids=self.collate.stop_ids
        )
        self.optimizer, self.scheduler, self.warmup_ratio = optimizer, scheduler, warmup_ratio
        self.strict_loading = False  # checkpoints hold the adapters only; the base comes from `vlm`

    @property
    def needs_negatives(self) -> bool:
        """Negative images are loaded and encoded only for a CRT term that counts."""
        return self.objective is not None and self.objective.weights.get("l_crt", 0.0) > 0

    # -- the objective ------------------------------------------------------------------------------------

    def loss_terms(self, batch: dict) -> dict[str, torch.Tensor]:
        """The stage's named loss terms on one training batch (docs/method.md#losses)."""
        if self.model.source is None:
            logits, targets, _ = self.model.plain(batch)
            return {"l_van": response_nll(logits, targets, num_tokens=self._token_count(len(targets)))}
        objective = self.objective
        features = self.model.source.features(batch, "train")
        views = self.model.fused_views(
            batch,
            features,
            self.collate.pad_id,
            negatives=self.needs_negatives,
            prefix_sharing=self.vlm_options.shares_prefix,
        )
        targets = views["targets"]
        n = self._token_count(len(targets))
        terms = {
            "l_van": response_nll(views["plain"], targets, num_tokens=n),
            "l_ep": response_nll(views["ep"], targets, num_tokens=n),
            "l_rda": rda_kl(
                views["plain"],
                views["ep"],
                direction=objective.rda_direction,
                temperature=objective.rda_temperature,
                num_tokens=n,
            ),
        }
        if self.needs_negatives:
            terms["l_crt"] = crt(views["plain"], views["neg"], targets, num_tokens=n)
        return terms

    def _token_count(self, n: int) -> torch.Tensor:
        """Per-rank denominator so DDP's gradient mean equals the sum over the *global* batch / its token count."""
        count = torch.tensor(float(n), device=self.device)
        trainer = self._trainer  # None outside a Trainer (notebooks, tests); `.trainer` would raise there
        if trainer is None or trainer.world_size == 1:
            return count
        return trainer.strategy.reduce(count, reduce_op="sum") / trainer.world_size

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        weights = self.objective.weights if self.objective is not None else {"l_van": 1.0}
        loss = None
        for name, value in terms.items():
            loss = weights[name] * value if loss is None else loss + weights[name] * value
        self.log_dict(
            {f"train/{k}": v for k, v in {**terms, "loss": loss}.items()},
            prog_bar=True,
            batch_size=len(batch["dataset"]),
        )
        return loss

    # -- evaluation ---------------------------------------------------------------------------------------

    def mode_inputs(self, batch: dict, split: str):
        """``(mode, batch, exemplars)`` of every mode of the stage: the VLM alone and, for VITask, the batch with
        exemplar slots and its flat ``(B * K, D)`` exemplars from the TSM's features."""
        yield "wo_ep", batch, None
        if self.model.source is not None:
            features = self.model.source.features(batch, split)
            vlm = self.model.vlm
            ep = insert_slots(batch, self.model.num_slots(features), vlm.image_token_id, self.collate.pad_id)
            exemplars = self.model.exemplars(features)
            yield "w_ep", ep, exemplars.reshape(-1, exemplars.shape[-1])

    def evaluate(self, batch: dict, split: str, protocols) -> dict:
        """Metrics of every mode on one batch; ``{mode: {protocol: probs}}``."""
        vlm, tok = self.model.vlm, self.collate.tokenizer
        return {
            mode: self.evaluation.update(vlm, view, split, mode, protocols, tok, exemplars)
            for mode, view, exemplars in self.mode_inputs(batch, split)
        }

    @torch.no_grad()
    def class_probabilities(self, batch: dict, split: str = "test") -> dict[str, torch.Tensor]:
        """``{mode: (B, K)}`` score-protocol probabilities of one batch, recording no metric (the classifier's)."""
        return {
            mode: class_probabilities(self.model.vlm, view, self.specs, exemplars)
            for mode, view, exemplars in self.mode_inputs(batch, split)
        }

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate(batch, "val", self.eval_settings.val_protocols)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate(batch, "test", self.eval_settings.test_protocols)

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        self._predictions.extend(predict_rows(self.specs, batch, self.evaluate(batch, "test", ["score"])))

    def on_predict_epoch_start(self) -> None:
        self._predictions: list[dict] = []

    def on_predict_epoch_end(self) -> None:
        write_stage_predictions(self, self._predictions)

    def on_validation_epoch_end(self) -> None:
        log_validation(self, self.evaluation.compute("val"), self.eval_settings.val_protocols[0])

    def on_test_epoch_end(self) -> None:
        log_test(self, self.evaluation.compute("test"))

    # -- data, checkpoints, optimizer ---------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "connect"):
            datamodule.connect(self.collate, negatives=self.needs_negatives)
        if self.model.source is not None and self.model.source.cache is not None:
            self._prepare_features(datamodule, stage)

    def _prepare_features(self, datamodule, stage: str) -> None:
        """Build/load the feature cache for this stage's splits: rank 0 builds, the others then read."""
        if datamodule is None or not hasattr(datamodule, "root"):
            raise ConfigError(
                "--model.init_args.exemplar.feature_cache: the cache reads a MedMNISTDataModule's files; pass "
                "feature_cache: false to run the TSM on each batch instead."
            )
        source, splits = self.model.source, _STAGE_SPLITS.get(stage, ("train", "val", "test"))
        if self.trainer.is_global_zero:
            # setup() runs before the strategy moves the model, so the TSM is still on the CPU: extract on the
            # accelerator (the strategy would move it there next anyway), or a paper-size build takes hours and
            # the other ranks' barrier times out (30 min). Tables stay on self.device, the CPU in a first setup.
            source.tsm.to(self.trainer.strategy.root_device)
            source.prepare(datamodule.root, splits, self.device)
        self.trainer.strategy.barrier()
        source.prepare(datamodule.root, splits, self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen base is dropped: LoRA and connector weights (and optimizer state) stay, so a 2B model's stage
        # checkpoint is megabytes. Loading rebuilds the base from `vlm` first.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter(k)}
        stamp(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # DeepSpeed hands this hook only its client state (weights restored by itself); the record is in it
        check_resume(self, checkpoint)

    def configure_optimizers(self):
        return configure_optimizers(self, self.parameters(), self.optimizer, self.scheduler, self.warmup_ratio)


def init_args(given: dict) -> dict:
    """A stage class's own arguments (its ``locals()`` at the top of ``__init__``), for :class:`VLMStage`.

    The stage classes keep explicit signatures, which ``--help`` and jsonargparse read; this passes them on
    without writing each name a second time. Only :class:`VLMStage`'s parameters pass (``init_from`` is the
    stage-2 class's own).
    """
    import inspect

    accepted = inspect.signature(VLMStage.__init__).parameters
    return {k: v for k, v in given.items() if k in accepted and k != "self"}


def _plain_hparams(module: L.LightningModule) -> None:
    """Store dataclass settings as dicts, so a checkpoint made from Python loads with ``weights_only=True``."""
    for key, value in module.hparams.items():
        if dataclasses.is_dataclass(value):
            module.hparams[key] = dataclasses.asdict(value)
