"""Evaluation of the VLM stages: per-dataset metrics in both protocols, their logs, the prediction rows."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from vitask_pl.data.catalog import DatasetSpec
from vitask_pl.eval.metrics import PerDatasetMetrics
from vitask_pl.eval.protocols import (
    PROTOCOLS,
    candidate_loglik,
    encode_prefix,
    generation_to_probs,
    greedy_generate,
    score_to_probs,
)
from vitask_pl.eval.results import flatten, log_dir, publish, write_predictions
from vitask_pl.models.vlm import VLM


class Evaluation(nn.Module):
    """Per-dataset metrics for every (split, mode, protocol) a stage reports; a holder, so they move and sync.

    ``mode`` is ``wo_ep`` (the VLM alone) or ``w_ep`` (with the TSM's exemplar).
    """

    def __init__(self, specs: Sequence[DatasetSpec], modes: Sequence[str], *, max_new_tokens: int, stop_ids):
        super().__init__()
        self.specs, self.modes, self.max_new_tokens, self.stop_ids = list(specs), list(modes), max_new_tokens, stop_ids
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{mode}_{protocol}": PerDatasetMetrics(
                    specs, report_invalid=protocol == "generate", auc=protocol == "score"
                )
                for split in ("val", "test")
                for mode in modes
                for protocol in PROTOCOLS
            }
        )
        self.used: dict[str, set[str]] = {"val": set(), "test": set()}

    @torch.no_grad()
    def update(self, vlm: VLM, batch: dict, split: str, mode: str, protocols, tokenizer, exemplars=None) -> dict:
        """Run the protocols on one batch; returns ``{protocol: (B, K) joint probabilities}`` for predictions."""
        out = {}
        for protocol in protocols:
            if protocol == "score":
                probs, invalid = class_probabilities(vlm, batch, self.specs, exemplars), None
            else:
                prefix = encode_prefix(vlm, batch, exemplars)
                tokens = greedy_generate(vlm, prefix, self.max_new_tokens, self.stop_ids)
                texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
                probs, invalid = generation_to_probs(texts, batch["dataset"].cpu(), self.specs)
                probs, invalid = probs.to(batch["targets"].device), invalid.to(batch["targets"].device)
            self.metrics[f"{split}_{mode}_{protocol}"].update(probs, batch["targets"], batch["dataset"], invalid)
            self.used[split].add(f"{mode}_{protocol}")
            out[protocol] = probs
        return out

    def compute(self, split: str) -> dict:
        """``{mode: {protocol: {dataset: {metric: value}}}}`` for what ran this epoch; resets."""
        results = {}
        for mode in self.modes:
            for protocol in PROTOCOLS:
                if f"{mode}_{protocol}" in self.used[split]:
                    metric = self.metrics[f"{split}_{mode}_{protocol}"]
                    results.setdefault(mode, {})[protocol] = metric.compute()
                    metric.reset()
        self.used[split] = set()
        return results


@torch.no_grad()
def class_probabilities(vlm: VLM, batch: dict, specs: Sequence[DatasetSpec], exemplars=None) -> torch.Tensor:
    """``(B, K)`` joint-space class probabilities of the ``score`` protocol: the candidates' likelihoods after
    one encoding of each prompt (its cache is consumed here)."""
    prefix = encode_prefix(vlm, batch, exemplars)
    loglik = candidate_loglik(vlm, prefix, batch["cand_ids"], batch["cand_mask"])
    return score_to_probs(loglik, batch["cand_valid"], batch["dataset"], specs)


def answer(spec: DatasetSpec, probs: torch.Tensor) -> str:
    """The class (or, multi-label, the findings above 0.5) that ``probs`` (this dataset's block) picks."""
    picked = (probs > 0.5).nonzero()[:, 0].tolist() if spec.multi_label else [int(probs.argmax())]
    return "; ".join(spec.labels[k] for k in picked) or "no finding"


def log_validation(module: L.LightningModule, results: dict, protocol: str) -> None:
    """Log every validation number; ``val/avg/acc`` (the checkpoint monitor) is the VLM alone under ``protocol``."""
    module.log("val/avg/acc", results["wo_ep"][protocol]["avg"]["acc"], prog_bar=True)
    module.log_dict(flatten(results, "val"))


def log_test(module: L.LightningModule, results: dict) -> None:
    module.log_dict(flatten(results, "test"))
    publish(module.trainer, results)


def predict_rows(specs, batch: dict, probs: dict) -> list[dict]:
    """One CSV row per sample and mode: dataset, index, label, prediction and the class probabilities (score)."""
    rows = []
    for b, (d, i) in enumerate(zip(batch["dataset"].tolist(), batch["index"].tolist())):
        spec = specs[d]
        cols = slice(spec.offset, spec.offset + spec.num_classes)
        for mode, by_protocol in probs.items():
            p = by_protocol["score"][b, cols]
            truth = batch["targets"][b, cols].nonzero()[:, 0].tolist()
            rows.append(
                {
                    "dataset": spec.flag,
                    "index": i,
                    "mode": mode,
                    "label": "; ".join(spec.labels[k] for k in truth) or "no finding",
                    "prediction": answer(spec, p),
                    **{f"p[{name}]": round(float(v), 6) for name, v in zip(spec.labels, p.tolist())},
                }
            )
    return rows


def write_stage_predictions(module: L.LightningModule, rows: list[dict]) -> None:
    trainer = module.trainer
    name = "predictions.csv" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.csv"
    path = write_predictions(log_dir(trainer) / name, rows)
    rank_zero_info(f"{len(rows)} predictions written to {path}")
