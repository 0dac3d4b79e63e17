"""Model shapes for the benchmark: random weights of the InternVL family at the real model's proportions.

The tiny test models have 4 image tokens in a 70-token sequence and a vocabulary of about 900; which
optimisation matters, and by how much, depends on those proportions. These shapes keep the real structure:

- ``proportional``: 448 px, 14-px patches, so 1,024 patches and **256 image tokens** after InternVL's 2x2 pixel
  shuffle, the real VITask instruction and response, and a **32,768-token** vocabulary; widths small enough for
  two CPU cores (language model 128 wide, 2 layers; vision tower 64 wide, 1 layer).
- ``real``: InternVL3-2B's sizes, written here, random weights, no download: InternViT-300M (1024 wide, 24
  layers, 16 heads, MLP 4096) and Qwen2.5-1.5B (1536 wide, 28 layers, 12 heads, 2 KV heads, MLP 8960) with its
  **151,674-token** vocabulary. Meant for the GPU; it also runs on the CPU, slowly.
"""

from __future__ import annotations

from vitask_pl.models.tiny import Dims, build_tiny_vlm

IMAGE_SIZE = 448  # InternVL's tile: 448 / 14 = 32 patches a side
SHAPES = {
    "proportional": Dims(
        hidden=128,
        layers=2,
        heads=4,
        kv_heads=2,
        mlp=256,
        grid=32,
        vocab=32768,
        vision=Dims(hidden=64, layers=1, heads=2, kv_heads=2, mlp=128),
    ),
    "real": Dims(
        hidden=1536,
        layers=28,
        heads=12,
        kv_heads=2,
        mlp=8960,
        grid=32,
        vocab=151674,
        vision=Dims(hidden=1024, layers=24, heads=16, kv_heads=16, mlp=4096),
    ),
}


def describe(name: str) -> str:
    s = SHAPES[name]
    v = s.vision
    return (
        f"{name}: {IMAGE_SIZE} px, {(s.grid // 2) ** 2} image tokens; language model {s.hidden} wide, {s.layers} "
        f"layers, {s.heads} heads ({s.kv_heads} KV), MLP {s.mlp}, vocabulary {s.vocab:,}; vision tower {v.hidden} "
        f"wide, {v.layers} layers, {v.heads} heads, MLP {v.mlp}"
    )


def build_shaped(name: str, out: str) -> str:
    """Save a random-weight InternVL of shape ``name`` (and its processor) to ``out``; returns ``out``."""
    return build_tiny_vlm("internvl", out, image_size=IMAGE_SIZE, shape=SHAPES[name])
