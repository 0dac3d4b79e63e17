"""The four VLM families, as data: where each keeps its vision tower, projector and decoder in transformers 5.

One list, read by the loader (:mod:`vitask_pl.models.vlm`) and the tiny-model builder (:mod:`vitask_pl.models.tiny`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vitask_pl.errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    vision: str  # vision encoder under model.model (frozen)
    projector: str | None  # the VLM's own vision->text projector (frozen); Qwen2-VL's merger sits inside `visual`
    language: str  # decoder under model.model; LoRA goes here only


FAMILIES = (
    Family("internvl", ("internvl",), "vision_tower", "multi_modal_projector", "language_model"),
    Family("llava", ("llava", "llava_next"), "vision_tower", "multi_modal_projector", "language_model"),
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), "visual", None, "language_model"),
    Family("idefics3", ("idefics3", "smolvlm"), "vision_model", "connector", "text_model"),
)
MODEL_TYPES = {t: f for f in FAMILIES for t in f.model_types}


def family_of(model_type: str, option: str = "--model.init_args.vlm") -> Family:
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{option}: model type {model_type!r} is not supported; supported families: "
            + "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
            + "."
        )
    return MODEL_TYPES[model_type]


FAMILY_NAMES = tuple(f.name for f in FAMILIES)
