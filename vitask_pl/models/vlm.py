"""Loading a VLM of one of four families, freezing it as the paper does, LoRA on its language model, and the
forward pieces every stage composes: image features, input embeddings, positions, decoder, head.

Families are data, not subclasses: where their vision tower, projector and decoder live under ``model.model``
in transformers 5 is the only thing that differs for training.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vitask_pl.data.collate import IGNORE
from vitask_pl.errors import ConfigError, MissingFileError, OfflineError
from vitask_pl.models.families import Family, family_of
from vitask_pl.models.tiny import TINY_PREFIX, resolve_tiny


@dataclass
class LoraSettings:
    """LoRA on the language model's linear layers (docs/method.md#lora).

    Args:
        r: rank.
        alpha: scaling numerator (scale = alpha / r).
        dropout: dropout on the LoRA input.
        targets: leaf names of linear layers, applied inside the language model only (``q_proj``, ...).
        target_regex: instead of ``targets``, a regex over full module names; must stay inside the language model.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    target_regex: str | None = None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_source(spec: str, image_size: int = 28, option: str = "--model.init_args.vlm") -> str:
    """``tiny:<family>`` -> cached tiny model dir; a local dir is checked; a hub id offline must be cached."""

    if spec.startswith(TINY_PREFIX):
        return resolve_tiny(spec, image_size, option=option)
    path = Path(spec)
    if path.is_dir():
        files = {p.name for p in path.iterdir()}
        missing = []
        if "config.json" not in files:
            missing.append("config.json")
        if not files & {"processor_config.json", "preprocessor_config.json"}:
            missing.append("processor_config.json/preprocessor_config.json")
        if not files & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}:
            missing.append("tokenizer.json/tokenizer_config.json")
        if missing:
            raise MissingFileError(
                f"{option}: {spec} has no {', '.join(missing)}; save the model with model.save_pretrained(dir) and "
                f"its processor with processor.save_pretrained(dir), or build a tiny one with `vitask tiny-vlm`."
            )
        return spec
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise MissingFileError(f"{option}: {spec} is neither a local directory nor a hub id (owner/name).")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
            raise OfflineError(
                f"{option}: {spec} is a hub id but HF_HUB_OFFLINE=1 and it is not in the local cache; pass a local "
                f"directory (model.save_pretrained) or a tiny offline model such as tiny:internvl."
            )
    return spec


def load_vlm(
    spec: str,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    image_size: int = 28,
    option: str = "--model.init_args.vlm",
):
    """``(model, processor, family)`` for a hub id, a local directory or ``tiny:<family>``."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    source = resolve_source(spec, image_size, option)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # unreadable JSON, no model_type, a config class transformers lacks
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"{option}: {spec} has no readable config.json ({reason}); save the model with model.save_pretrained(dir), "
            f"or build a tiny one with `vitask tiny-vlm`."
        ) from err
    family = family_of(config.model_type, option)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    if getattr(processor, "image_token", None) is None and getattr(config, "image_token_id", None) is None:
        raise ConfigError(f"{option}: the processor of {spec} defines no image token, so images cannot be placed.")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--model.init_args.vlm_options.dtype: {dtype!r}; use auto, float32, bfloat16 or float16.")
    with _load_bar_on_terminal_only():
        model = AutoModelForImageTextToText.from_pretrained(
            source,
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    return model, processor, family


@contextmanager
def _load_bar_on_terminal_only():
    """transformers 5 draws a "Loading weights" bar on stderr; in a log or a captured stderr it is only noise
    (and it would stand before a one-line error about the model, e.g. LoRA targets that match nothing)."""
    from transformers.utils import logging as hf_logging

    quiet = hf_logging.is_progress_bar_enabled() and not sys.stderr.isatty()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def lora_target_names(model: nn.Module, family: Family, lora: LoraSettings) -> list[str]:
    """Full names of the linear layers LoRA wraps: the language model's only, or a clear error.

    Plain leaf names (``q_proj``) would also hit the vision tower, which uses the same names, so they are
    scoped to the family's decoder. ``target_regex`` is matched against full names and must stay inside it.
    """
    scope = f"model.{family.language}."
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if lora.target_regex:
        matched = [n for n in linear if re.fullmatch(lora.target_regex, n)]
        outside = [n for n in matched if not n.startswith(scope)]
        if outside:
            raise ConfigError(
                f"--model.init_args.lora.target_regex: {lora.target_regex!r} matches {outside[0]} outside the language "
                f"model (the vision encoder and projector stay frozen); restrict it to '{scope}...'."
            )
        option, asked = "--model.init_args.lora.target_regex", repr(lora.target_regex)
    else:
        matched = [n for n in linear if n.startswith(scope) and n.rsplit(".", 1)[-1] in lora.targets]
        option, asked = "--model.init_args.lora.targets", str(lora.targets)
    if not matched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear if n.startswith(scope)})
        raise ConfigError(
            f"{option}: {asked} matches no linear layer of the language model; "
            f"its layers are named {', '.join(leaves)}."
        )
    return matched


def freeze_and_add_lora(model: nn.Module, family: Family, lora: LoraSettings) -> list[str]:
    """Freeze everything (vision encoder, projector, LLM), then add trainable LoRA to the LLM only."""
    from peft import LoraConfig, inject_adapter_in_model

    for name, value in (("r", lora.r), ("alpha", lora.alpha)):
        if value <= 0:
            raise ConfigError(f"--model.init_args.lora.{name}: {value} must be positive.")
    names = lora_target_names(model, family, lora)
    model.requires_grad_(False)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names, bias="none")
    inject_adapter_in_model(config, model)  # in place: module paths stay those of transformers
    for param in model.parameters():
        if param.requires_grad:  # peft creates LoRA in the base's dtype; bf16 optimizer updates would underflow
            param.data = param.data.float()
    return names


def flat_features(output) -> torch.Tensor:
    """``get_image_features(...).pooler_output`` -> ``(image tokens in batch, D)``.

    transformers 5 returns a list/tuple of per-image tensors for LLaVA, Qwen2-VL and Idefics3, and one
    ``(B, T, D)`` tensor for InternVL.
    """
    pooled = output.pooler_output
    if isinstance(pooled, (list, tuple)):
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled])
    return pooled.reshape(-1, pooled.shape[-1])


class VLM(nn.Module):
    """A transformers VLM seen as the pieces VITask composes. Holds no training logic.

    Args:
        model: a ``*ForConditionalGeneration`` of one of the four families.
        family: its :class:`Family`.
        image_token_id: id of the image placeholder in ``input_ids``.
    """

    def __init__(self, model: nn.Module, family: Family, image_token_id: int):
        super().__init__()
        self.model, self.family, self.image_token_id = model, family, image_token_id

    @property
    def decoder(self) -> nn.Module:
        return getattr(self.model.model, self.family.language)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    def image_features(self, pixel: dict) -> torch.Tensor:
        """The frozen vision path (encoder + the VLM's projector): ``(image tokens in batch, hidden)``."""
        dtype = self.model.get_input_embeddings().weight.dtype
        pixel = {k: (v.to(dtype) if k == "pixel_values" else v) for k, v in pixel.items()}
        return flat_features(self.model.model.get_image_features(**pixel, return_dict=True))

    def embed(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor,
        exemplar_mask: torch.Tensor | None = None,
        exemplars: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features (and exemplar rows) scattered into their placeholders.

        Args:
            input_ids: ``(B, L)``.
            image_features: ``(n, D)`` rows for the ``n`` image tokens of the batch, in reading order.
            exemplar_mask: ``(B, L)`` bool, the exemplar slots.
            exemplars: ``(m, D)`` rows for the ``m`` slots, in reading order.
        """
        embeds = self.model.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.image_token_id
        n_tokens, n_features = int(image_mask.sum()), image_features.shape[0]
        if n_tokens != n_features:
            raise ConfigError(
                f"--model.init_args.vlm: {n_tokens} image tokens in input_ids but the vision tower gave {n_features} "
                f"image features; the processor and the model disagree (image size or image_seq_length)."
            )
        embeds = embeds.masked_scatter(image_mask[..., None], image_features.to(embeds.dtype))
        if exemplar_mask is not None:
            embeds = embeds.masked_scatter(exemplar_mask[..., None], exemplars.to(embeds.dtype))
        return embeds

    def positions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Position ids: Qwen2-VL's 3-D M-RoPE ``(3, B, L)`` (from its token types and image grids), else
        ``(B, L)`` counting real tokens only."""
        if self.family.name == "qwen2_vl":
            positions, _ = self.model.model.get_rope_index(
                input_ids,
                mm_token_type_ids=mm_token_type_ids,
                image_grid_thw=image_grid_thw,
                attention_mask=attention_mask,
            )
            return positions
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

    def decode(self, embeds, attention_mask, positions, *, cache=None, use_cache: bool = False):
        """The decoder without its head: ``(last hidden states (B, L, D), cache)``."""
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.cache

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head, applied only to the rows given (response positions), never to the whole sequence."""
        return self.model.get_output_embeddings()(hidden)


def gather_response(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states that predict response tokens: position ``t`` predicts label ``t + 1``.

    Args:
        hidden: ``(B, L, D)``.
        labels: ``(B, L)`` with ``IGNORE`` outside the response.

    Returns: ``(N, D)`` hidden rows, ``(N,)`` target tokens, ``(N,)`` batch row of each.
    """
    shifted = labels[:, 1:]
    keep = shifted != IGNORE
    return hidden[:, :-1][keep], shifted[keep], keep.nonzero()[:, 0]


def build_vlm(
    spec: str,
    *,
    lora: LoraSettings | dict,
    image_size: int = 28,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
):
    """Load, freeze, add LoRA: ``(VLM, processor)`` ready for any VITask stage."""
    if isinstance(lora, dict):  # checkpoints store the settings as a plain dict (weights_only loading)
        lora = LoraSettings(**lora)
    model, processor, family = load_vlm(
        spec,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        image_size=image_size,
    )
    freeze_and_add_lora(model, family, lora)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, which a frozen embedding never has.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return VLM(model, family, image_token_id), processor
