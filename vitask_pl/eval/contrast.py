"""The paper's Fig. 3 analogue: how much likelier the response is under its own image than under another's."""

from __future__ import annotations

import torch

from vitask_pl.models.vitask_model import VITaskModel


@torch.no_grad()
def response_probabilities(model: VITaskModel, loader, device="cpu") -> dict[str, torch.Tensor]:
    """Per sample, the mean over response tokens of p(y_t | image, prompt, y_<t) with its own image (``pos``)
    and with a different-label image of the same dataset (``neg``); batches must carry ``neg_pixel``."""
    out = {"pos": [], "neg": [], "dataset": []}
    for batch in loader:
        batch = _to(batch, device)
        rows = {}
        for name, pixel in (("pos", batch["pixel"]), ("neg", batch["neg_pixel"])):
            logits, targets, row_ids = model.plain(batch, pixel)
            p = torch.softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
            count = torch.zeros(len(batch["dataset"]), device=p.device).index_add_(0, row_ids, torch.ones_like(p))
            rows[name] = torch.zeros_like(count).index_add_(0, row_ids, p) / count.clamp_min(1)
        out["pos"].append(rows["pos"].cpu())
        out["neg"].append(rows["neg"].cpu())
        out["dataset"].append(batch["dataset"].cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _to(x, device):
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x.to(device) if torch.is_tensor(x) else x
