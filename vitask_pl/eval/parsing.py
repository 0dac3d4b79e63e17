"""Generated text -> a class (or a set of findings), by normalised exact match against the label names."""

from __future__ import annotations

import re

import torch

from vitask_pl.data.catalog import DatasetSpec
from vitask_pl.data.prompts import NO_FINDING


def normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace, quotes or final full stop."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.rstrip(".").strip("\"'` ").rstrip(".").strip()


def parse_answer(text: str, spec: DatasetSpec) -> torch.Tensor | None:
    """``(C,)`` one-hot (multi-hot for multi-label) prediction, or ``None`` when the answer matches no label.

    A label name may itself contain a comma ("normal, benign"), so single-label answers are matched whole;
    multi-label answers are the findings joined by ", " (or ``no finding``), every part must be a finding.
    """
    answer = normalise(text)
    names = [normalise(n) for n in spec.labels]
    out = torch.zeros(spec.num_classes)
    if not spec.multi_label:
        if answer not in names:
            return None
        out[names.index(answer)] = 1
        return out
    if answer == NO_FINDING:
        return out
    parts = [p.strip() for p in answer.split(",")]
    if not parts or any(p not in names for p in parts):
        return None
    for p in parts:
        out[names.index(p)] = 1
    return out
