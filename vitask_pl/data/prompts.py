"""Instruction and response text of VITask (docs/method.md#prompts), after MedDr."""

from __future__ import annotations

from collections.abc import Sequence

from vitask_pl.data.catalog import DatasetSpec

NO_FINDING = "no finding"  # ChestMNIST response when no finding is present


def instruction(spec: DatasetSpec, *, incomplete: bool = False) -> str:
    """``incomplete`` drops the label-set sentence (the paper's robustness experiment)."""
    text = f"Analyze the given {spec.modality} image."
    if not incomplete:
        text += f" The possible diagnoses are: {', '.join(spec.labels)}."
    return text


def response(spec: DatasetSpec, label: Sequence[int]) -> str:
    """The class name; for multi-label, the present findings in label order or ``no finding``."""
    if spec.multi_label:
        present = [name for name, on in zip(spec.labels, label) if on]
        return ", ".join(present) if present else NO_FINDING
    return spec.labels[int(label[0])]


def candidate_responses(spec: DatasetSpec) -> list[str]:
    """The responses a classifier chooses among: one per class (per finding, plus ``no finding``, for chest)."""
    return [*spec.labels, NO_FINDING] if spec.multi_label else list(spec.labels)
