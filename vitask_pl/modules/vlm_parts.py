"""Pieces every VLM stage composes: the response forward, evaluation in both protocols, small checkpoints.

Functions and one small ``nn.Module`` holder, not a base class: each stage's LightningModule reads top to
bottom and calls these.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from vitask_pl.data.catalog import DatasetSpec
from vitask_pl.errors import ConfigError
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
from vitask_pl.models.exemplar import insert_slots
from vitask_pl.models.vlm import IGNORE, VLM, gather_response


def response_logits(
    vlm: VLM, batch: dict, image_features: torch.Tensor, exemplars: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced logits at response positions only: ``(N, V)`` logits, ``(N,)`` targets, ``(N,)`` rows.

    The LM head never sees the image or instruction positions (vocabularies are 32k-150k wide).
    """
    embeds = vlm.embed(batch["input_ids"], image_features, batch.get("exemplar_mask"), exemplars)
    positions = vlm.positions(batch["input_ids"], batch["attention_mask"], batch)
    hidden, _ = vlm.decode(embeds, batch["attention_mask"], positions)
    rows, targets, row_ids = gather_response(hidden, batch["labels"])
    return vlm.head(rows), targets, row_ids


def fused_views(vlm: VLM, batch: dict, exemplars: torch.Tensor, pad_id: int, *, negatives: bool) -> dict:
    """The EP, plain and (with ``negatives``) negative views of a batch through the decoder as ONE batch.

    The frozen vision features of image_i are computed once and shared by its EP and plain rows; the negative
    rows reuse the plain rows' text with image_j's features. Logits are taken at response positions only; all
    views hold the same response tokens, so the rows align across views.

    Args:
        batch: a :class:`~vitask_pl.data.chat.ChatBatch` batch (with ``neg_pixel`` for negatives).
        exemplars: ``(B, K, D)`` exemplar embeddings from the TSM connector.

    Returns: ``{"ep", "plain", "neg"}`` logits ``(N, V)`` (``neg`` only with negatives) and ``targets`` ``(N,)``.
    """
    ep = insert_slots(batch, exemplars.shape[1], vlm.image_token_id, pad_id)
    length = ep["input_ids"].shape[1]

    def padded(x: torch.Tensor, fill) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=fill)

    n_views = 3 if negatives else 2
    plain = {
        "input_ids": padded(batch["input_ids"], pad_id),
        "attention_mask": padded(batch["attention_mask"], 0),
        "labels": padded(batch["labels"], IGNORE),
    }
    fused = {k: torch.cat([ep[k]] + [plain[k]] * (n_views - 1)) for k in plain}
    slots = torch.cat([ep["exemplar_mask"]] + [torch.zeros_like(ep["exemplar_mask"])] * (n_views - 1))
    image_i = vlm.image_features(batch["pixel"])
    features = [image_i, image_i] + ([vlm.image_features(batch["neg_pixel"])] if negatives else [])
    pixels = [batch["pixel"]] * 2 + ([batch["neg_pixel"]] if negatives else [])
    if "mm_token_type_ids" in batch:  # Qwen2-VL's M-RoPE reads the token types and the image grids
        fused["mm_token_type_ids"] = torch.cat(
            [ep["mm_token_type_ids"]] + [padded(batch["mm_token_type_ids"], 0)] * (n_views - 1)
        )
        fused["pixel"] = {"image_grid_thw": torch.cat([p["image_grid_thw"] for p in pixels])}
    embeds = vlm.embed(fused["input_ids"], torch.cat(features), slots, exemplars.reshape(-1, exemplars.shape[-1]))
    positions = vlm.positions(fused["input_ids"], fused["attention_mask"], fused)
    hidden, _ = vlm.decode(embeds, fused["attention_mask"], positions)
    rows, targets, _ = gather_response(hidden, fused["labels"])
    logits = vlm.head(rows).chunk(n_views)
    out = {"ep": logits[0], "plain": logits[1], "targets": targets.chunk(n_views)[0]}
    if negatives:
        out["neg"] = logits[2]
    return out


def token_denominator(module: L.LightningModule, n: int, device) -> torch.Tensor:
    """Per-rank denominator so DDP's gradient mean equals the sum over the *global* batch / its token count."""
    count = torch.tensor(float(n), device=device)
    trainer = module._trainer  # None outside a Trainer (notebooks, tests); `.trainer` would raise there
    if trainer is None or trainer.world_size == 1:
        return count
    return trainer.strategy.reduce(count, reduce_op="sum") / trainer.world_size


def check_protocols(protocols: Sequence[str], option: str) -> list[str]:
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ConfigError(f"{option}: {list(protocols)}; choose from {list(PROTOCOLS)}.")
    return list(protocols)


def plain_hparams(module: L.LightningModule) -> None:
    """Store dataclass settings as dicts, so a checkpoint made from Python loads with ``weights_only=True``."""
    import dataclasses

    for key, value in module.hparams.items():
        if dataclasses.is_dataclass(value):
            module.hparams[key] = dataclasses.asdict(value)


def is_adapter(key: str) -> bool:
    """LoRA weights and the VITask TSM connector (not Idefics3's own ``connector``, which is the frozen base)."""
    return "lora_" in key or key.startswith("core.connector.")


def keep_adapters(checkpoint: dict) -> None:
    """Drop the frozen base from a checkpoint: LoRA and connector weights (and optimizer state) stay, so a 2B
    model's stage checkpoint is megabytes. Loading rebuilds the base from ``vlm`` first."""
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter(k)}


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
            prefix = encode_prefix(vlm, batch, exemplars)  # each protocol consumes its own cache
            if protocol == "score":
                loglik = candidate_loglik(vlm, prefix, batch["cand_ids"], batch["cand_mask"])
                probs, invalid = score_to_probs(loglik, batch["cand_valid"], batch["dataset"], self.specs), None
            else:
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
            pred = (p > 0.5).nonzero()[:, 0].tolist() if spec.multi_label else [int(p.argmax())]
            truth = batch["targets"][b, cols].nonzero()[:, 0].tolist()
            rows.append(
                {
                    "dataset": spec.flag,
                    "index": i,
                    "mode": mode,
                    "label": "; ".join(spec.labels[k] for k in truth) or "no finding",
                    "prediction": "; ".join(spec.labels[k] for k in pred) or "no finding",
                    **{f"p[{name}]": round(float(v), 6) for name, v in zip(spec.labels, p.tolist())},
                }
            )
    return rows


def write_stage_predictions(module: L.LightningModule, rows: list[dict]) -> None:
    trainer = module.trainer
    name = "predictions.csv" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.csv"
    path = write_predictions(log_dir(trainer) / name, rows)
    rank_zero_info(f"{len(rows)} predictions written to {path}")
