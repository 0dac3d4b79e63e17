"""Analytic FLOPs of a training step under frozen-base LoRA, so the bench can say how close each variant is to
its floor: measured time ratio / FLOP ratio, both against vanilla, is 1.0 for a variant that wastes nothing.

Per token through the decoder, with ``N`` the decoder's matrix parameters (its layers' linear weights, frozen),
``r`` LoRA's, ``l`` layers, ``d`` width and ``c`` the positions a token attends to (causal: half the sequence):

    forward           2 N + 2 r + 4 l d c        (matmuls; attention scores and weighted sum)
    activation grads  2 N + 2 r + 8 l d c        (through the frozen weights; attention's backward is 2x)
    LoRA weight grads 2 r
    total             4 N + 6 r + 12 l d c

plus, per response row, the LM head's ``4 d V`` (forward and its activation gradient; the head is frozen), and
per image the frozen vision tower's forward, ``2 N_vision`` per patch (no gradient flows into it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Counts:
    """The sizes the FLOPs depend on, read off a model once."""

    decoder: int  # N: matrix parameters of the decoder layers (LoRA excluded)
    lora: int  # r
    layers: int
    width: int
    vocab: int
    vision: int  # N_vision: matrix parameters of the vision tower and projector
    patches: int  # vision tokens per image (before any merge)


def counts(vlm, patches: int) -> Counts:
    """:class:`Counts` of a :class:`~vitask_pl.models.vlm.VLM` (LoRA'd)."""
    family, inner = vlm.family, vlm.model.model

    def matrices(module, lora: bool) -> int:
        return sum(
            p.numel()
            for n, p in module.named_parameters()
            if p.ndim == 2 and ("lora_" in n) == lora and "embed" not in n
        )

    vision = matrices(getattr(inner, family.vision), False)
    if family.projector:
        vision += matrices(getattr(inner, family.projector), False)
    decoder = vlm.decoder
    return Counts(
        decoder=matrices(decoder, False),
        lora=matrices(decoder, True),
        layers=len(decoder.layers),
        width=vlm.hidden_size,
        vocab=vlm.model.get_output_embeddings().weight.shape[0],
        vision=vision,
        patches=patches,
    )


def decoder_flops(c: Counts, rows: int, length: int, past: int = 0) -> float:
    """A training pass of ``rows`` sequences of ``length`` new tokens after ``past`` cached positions."""
    attended = past + length / 2  # causal: a token sees the cache and, on average, half its own sequence
    per_token = 4 * c.decoder + 6 * c.lora + 12 * c.layers * c.width * attended
    return float(rows * length * per_token)


def head_flops(c: Counts, response_rows: int) -> float:
    return float(4 * c.width * c.vocab * response_rows)


def vision_flops(c: Counts, images: int) -> float:
    return float(2 * c.vision * c.patches * images)


def step_flops(c: Counts, batch: dict, *, variant: str, slots: int, prefix: int) -> float:
    """One step of ``variant`` on ``batch`` (right-padded, so padding counts: it is computed too).

    ``vanilla``: the plain view, the head at response rows only. ``full``: the same with the head at every position
    (what a generic causal-LM loss computes). ``fused``: EP, plain and negative views as one batch, each ``L + slots`` long.
    ``separate``: the three views as three forwards (EP ``L + slots``, plain and negative ``L``; three images). ``shared``:
    the fused views with their common ``prefix`` run once per image (plain and negative), then three suffixes.
    """
    b, length = batch["input_ids"].shape
    response = int((batch["labels"] != -100).sum())
    if variant in ("vanilla", "full"):
        rows = response if variant == "vanilla" else b * (length - 1)
        return decoder_flops(c, b, length) + head_flops(c, rows) + vision_flops(c, b)
    images = vision_flops(c, 2 * b)  # own and negative image, each through the tower once
    head = head_flops(c, 3 * response)
    if variant == "fused":
        return decoder_flops(c, 3 * b, length + slots) + head + images
    if variant == "separate":  # its EP and plain forwards each run the tower on the own image
        return decoder_flops(c, b, length + slots) + decoder_flops(c, 2 * b, length) + head + vision_flops(c, 3 * b)
    if variant == "shared":
        suffix = length + slots - prefix
        return decoder_flops(c, 2 * b, prefix) + decoder_flops(c, 3 * b, suffix, past=prefix) + head + images
    raise ValueError(f"unknown variant {variant!r}")
