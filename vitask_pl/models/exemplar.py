"""Exemplar prompting: the TSM connector and the exemplar slots in the token sequence (docs/method.md#ep)."""

from __future__ import annotations

import torch
from torch import nn

from vitask_pl.data.collate import IGNORE


class TSMConnector(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear from the TSM feature width to the LLM width.

    A pooled feature ``(B, F)`` becomes ``num_tokens`` exemplar tokens ``(B, num_tokens, D)``; patch features
    ``(B, T, F)`` become one exemplar token each ``(B, T, D)`` (the paper's EP_all variant).
    """

    def __init__(self, feature_dim: int, hidden_dim: int, num_tokens: int = 1):
        super().__init__()
        self.feature_dim, self.num_tokens = feature_dim, num_tokens
        self.net = nn.Sequential(
            nn.LayerNorm(feature_dim),
            nn.Linear(feature_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim * num_tokens),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.net(features)
        if features.ndim == 2:
            return out.view(features.shape[0], self.num_tokens, -1)
        return out  # patch features: (B, T, D), num_tokens == 1


def insert_slots(batch: dict, num_slots: int, image_token_id: int, fill_id: int) -> dict:
    """The exemplar view of a text batch: ``num_slots`` placeholder tokens right after each row's last image token.

    ``input_ids`` get ``fill_id`` there (its embedding is replaced by the exemplar), ``attention_mask`` 1,
    ``labels`` ``IGNORE``, ``mm_token_type_ids`` 0 (text); ``prompt_len`` grows by ``num_slots`` and
    ``exemplar_mask`` ``(B, L + num_slots)`` marks the slots. Other keys are shared, not copied.
    """
    ids = batch["input_ids"]
    b, length = ids.shape
    is_image = ids == image_token_id
    if not bool(is_image.any(dim=1).all()):
        raise ValueError("insert_slots: a row has no image token, so there is nowhere to put its exemplar.")
    after = length - is_image.flip(1).int().argmax(dim=1)  # index just past the last image token
    col = torch.arange(length, device=ids.device)[None]
    new_col = col + num_slots * (col >= after[:, None])  # (B, L): where each old token goes
    slot_col = after[:, None] + torch.arange(num_slots, device=ids.device)[None]  # (B, K)

    def spread(x: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((b, length + num_slots), fill, dtype=x.dtype, device=x.device)
        return out.scatter(1, new_col, x)

    view = dict(batch)
    view["input_ids"] = spread(ids, fill_id)
    view["attention_mask"] = spread(batch["attention_mask"], 1)
    view["labels"] = spread(batch["labels"], IGNORE)
    if "mm_token_type_ids" in batch:
        view["mm_token_type_ids"] = spread(batch["mm_token_type_ids"], 0)
    view["prompt_len"] = batch["prompt_len"] + num_slots
    mask = torch.zeros(b, length + num_slots, dtype=torch.bool, device=ids.device)
    view["exemplar_mask"] = mask.scatter(1, slot_col, True)
    return view
