"""The VLM stages' settings, in small documented groups (``--model.init_args.<group>.<field>``).

Each group checks itself with :meth:`check` when a stage is built, so a bad value is one line naming its
option; plain dataclasses, so jsonargparse prints every field in ``--help`` and checkpoints store them as dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vitask_pl.errors import ConfigError
from vitask_pl.eval.protocols import PROTOCOLS

OPTION = "--model.init_args"
DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class VLMOptions:
    """How the VLM is loaded and fed.

    Args:
        dtype: weights dtype of the frozen base (``float32``, ``bfloat16``, ``float16``, ``auto``).
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
        gradient_checkpointing: trade compute for activation memory.
        trust_remote_code: allow remote code in the checkpoint (off: the four families are native).
        max_length: longest tokenized sample allowed; longer ones are an error, never truncated.
        processor_kwargs: extra keyword arguments for every processor call.
        prefix_sharing: VITask stages: run the prefix the EP and plain views share (up to the last image token)
            through the decoder once; exact, and cheaper by that prefix (``false``: every view whole). Default
            (``null``): on, except with ``gradient_checkpointing``, whose checkpointed layers keep no cache.
    """

    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    max_length: int = 2048
    processor_kwargs: dict = field(default_factory=dict)
    prefix_sharing: bool | None = None

    def check(self) -> None:
        if self.prefix_sharing and self.gradient_checkpointing:
            raise ConfigError(
                f"{OPTION}.vlm_options.prefix_sharing: true needs the decoder's cache, which gradient checkpointing "
                f"drops in training; set vlm_options.gradient_checkpointing: false, or prefix_sharing: false."
            )

    @property
    def shares_prefix(self) -> bool:
        return not self.gradient_checkpointing if self.prefix_sharing is None else self.prefix_sharing


@dataclass
class ExemplarSettings:
    """Where the exemplar comes from and how many tokens it takes.

    Args:
        tokens: exemplar tokens per image from the pooled feature.
        feature_kind: ``pooled`` (CLS / pooled feature) or ``patch`` (one token per patch, the paper's EP_all).
        feature_cache: look TSM features up in a per-split cache (the TSM stays out of the step).
        cache_dir: where the cache lives (default ``~/.cache/vitask/features``).
    """

    tokens: int = 1
    feature_kind: str = "pooled"
    feature_cache: bool = True
    cache_dir: str | None = None

    def check(self) -> None:
        if self.tokens < 1 or (self.feature_kind == "patch" and self.tokens != 1):
            raise ConfigError(
                f"{OPTION}.exemplar.tokens: {self.tokens}; use >= 1 with pooled features "
                f"and 1 with patch features (one exemplar token per patch)."
            )


@dataclass
class Objective:
    """Stage 1's loss ``L_van + L_EP + alpha * L_RDA`` (docs/method.md#rda).

    Args:
        alpha: weight of ``L_RDA`` (0 switches it off: the "CRT only" row in stage 2).
        rda_direction: ``reverse`` KL(plain || EP) as in the paper, or ``forward``.
        rda_temperature: softmax temperature of the RDA KL.
    """

    alpha: float = 1.0
    rda_direction: str = "reverse"
    rda_temperature: float = 1.0

    @property
    def weights(self) -> dict[str, float]:
        """Each loss term's weight in the stage's sum."""
        return {"l_van": 1.0, "l_ep": 1.0, "l_rda": self.alpha}

    def check(self) -> None:
        for name, value in self.weights.items():
            if not value >= 0:
                option = f"{OPTION}.objective.{dict(l_rda='alpha', l_crt='beta')[name]}"
                raise ConfigError(f"{option}: {value}; loss weights must be >= 0 (0 switches the term off).")
        if self.rda_direction not in ("reverse", "forward"):
            raise ConfigError(
                f"{OPTION}.objective.rda_direction: {self.rda_direction!r}; use 'reverse' (the paper's) or 'forward'."
            )
        if not self.rda_temperature > 0:
            raise ConfigError(
                f"{OPTION}.objective.rda_temperature: {self.rda_temperature}; use a temperature > 0 (1 is the paper's)."
            )


@dataclass
class CRTObjective(Objective):
    """Stage 2's loss ``L_van + L_EP + alpha * L_RDA + beta * L_CRT`` (docs/method.md#crt, #ablations).

    Args:
        alpha: weight of ``L_RDA`` (0 switches it off: the paper's "CRT only" row).
        rda_direction: ``reverse`` KL(plain || EP) as in the paper, or ``forward``.
        rda_temperature: softmax temperature of the RDA KL.
        beta: weight of ``L_CRT`` (0 switches it off: the paper's "RDA only" row).
    """

    beta: float = 1.0

    @property
    def weights(self) -> dict[str, float]:
        return {**super().weights, "l_crt": self.beta}


@dataclass
class EvalSettings:
    """How validation and test read a class off the VLM (docs/method.md#evaluation).

    Args:
        val_protocols: protocols run at validation (``score`` is cheap; ``generate`` decodes).
        test_protocols: protocols run at test.
        max_new_tokens: decoding budget of ``generate`` (label names are a few tokens).
    """

    val_protocols: list[str] = field(default_factory=lambda: ["score"])
    test_protocols: list[str] = field(default_factory=lambda: ["score", "generate"])
    max_new_tokens: int = 24

    def check(self) -> None:

        for name in ("val_protocols", "test_protocols"):
            protocols = getattr(self, name)
            if not protocols or any(p not in PROTOCOLS for p in protocols):
                raise ConfigError(f"{OPTION}.evaluation.{name}: {list(protocols)}; choose from {list(PROTOCOLS)}.")


def as_settings(cls, value):
    """A group from a config value: the dataclass itself, a dict (a checkpoint's hparams), or ``None`` (defaults)."""
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value
