"""Synthetic MedMNIST: files in the exact official layout with learnable, non-trivial class structure.

Each class owns a prototype (a few Gaussian blobs and a grating with class-specific orientation and
frequency). A sample is its prototype, randomly shifted and scaled, mixed with a random other class's
prototype, over a smooth random texture and pixel noise, so a classifier must learn the prototypes and cannot
read the class off a constant. Multi-label ChestMNIST gets one localised pattern per present finding.
Deterministic in ``seed``; nothing here claims to be medical data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitask_pl.atomic import atomic_path
from vitask_pl.data.catalog import FLAGS, DatasetSpec, check_size, dataset_specs, resolve_flags
from vitask_pl.data.files import npz_path
from vitask_pl.errors import ConfigError

SPLIT_FRACTIONS = {"train": 1.0, "val": 0.25, "test": 0.5}  # per-class counts relative to --per-class


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.linspace(-1.0, 1.0, size)
    return torch.meshgrid(coords, coords, indexing="ij")


def _prototypes(rng: np.random.Generator, n: int, channels: int, size: int) -> torch.Tensor:
    """(n, channels, size, size) zero-mean patterns, one per class."""
    yy, xx = _grid(size)
    protos = torch.zeros(n, channels, size, size)
    for k in range(n):
        for c in range(channels):
            pattern = torch.zeros(size, size)
            for _ in range(3):
                cy, cx = rng.uniform(-0.6, 0.6, 2)
                width, sign = rng.uniform(0.15, 0.4), rng.choice([-1.0, 1.0])
                pattern += sign * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
            angle = np.pi * (k + rng.uniform(0, 0.5)) / n
            freq = 2.0 + 3.0 * ((k * 7 + c) % n) / max(n - 1, 1)
            pattern += 0.6 * torch.cos(np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
            protos[k, c] = pattern - pattern.mean()
    return protos / protos.flatten(1).std(dim=1).clamp_min(1e-6)[:, None, None, None]


def _finding_patterns(rng: np.random.Generator, n: int, channels: int, size: int) -> torch.Tensor:
    """(n, channels, size, size) localised bright/dark spots, one per finding."""
    yy, xx = _grid(size)
    out = torch.zeros(n, channels, size, size)
    for k in range(n):
        cy, cx = rng.uniform(-0.7, 0.7, 2)
        width = rng.uniform(0.12, 0.25)
        out[k] = rng.choice([-1.0, 1.0]) * 1.5 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    return out


def _render(rng: np.random.Generator, signal: torch.Tensor, size: int) -> np.ndarray:
    """signal (N, C, H, W) -> uint8 images with a random shift, smooth texture and noise."""
    n, c = signal.shape[:2]
    max_shift = max(1, size // 10)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
    signal = torch.stack([torch.roll(s, (int(dy), int(dx)), dims=(-2, -1)) for s, (dy, dx) in zip(signal, shifts)])
    coarse = torch.from_numpy(rng.normal(size=(n, c, 4, 4))).float()
    texture = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    noise = torch.from_numpy(rng.normal(size=(n, c, size, size))).float()
    x = signal + 0.9 * texture + 0.9 * noise
    images = (128 + 40 * x).clamp(0, 255).round().to(torch.uint8)
    images = images.permute(0, 2, 3, 1).numpy()
    return images[..., 0] if c == 1 else images


def synth_dataset(spec: DatasetSpec, size: int, per_class: int, seed: int) -> dict[str, np.ndarray]:
    """All six arrays of one dataset file."""
    rng = np.random.default_rng([seed, FLAGS.index(spec.flag), size])
    channels, n = spec.n_channels, spec.num_classes
    arrays = {}
    if spec.multi_label:
        patterns = _finding_patterns(rng, n, channels, size)
        base = _prototypes(rng, 1, channels, size)[0]
    else:
        protos = _prototypes(rng, n, channels, size)
    for split, fraction in SPLIT_FRACTIONS.items():
        count = max(2, round(per_class * fraction))
        if spec.multi_label:
            # At least one "no finding" and one of each finding.
            total = max(n + 2, count * 4)
            labels = (rng.random((total, n)) < 0.08).astype(np.uint8)  # mostly "no finding", as in ChestMNIST
            labels[0] = 0
            labels[1 + np.arange(n), np.arange(n)] = 1
            amp = torch.from_numpy(rng.uniform(0.7, 1.3, size=(total, n))).float()
            signal = 0.5 * base + torch.einsum("bk,bk,kchw->bchw", torch.from_numpy(labels).float(), amp, patterns)
        else:
            y = np.repeat(np.arange(n), count)
            rng.shuffle(y)
            other = (y + rng.integers(1, n, size=len(y))) % n
            scale = torch.from_numpy(rng.uniform(0.5, 1.1, size=len(y))).float()[:, None, None, None]
            mix = torch.from_numpy(rng.uniform(0.0, 0.9, size=len(y))).float()[:, None, None, None]
            signal = scale * protos[torch.from_numpy(y)] + mix * protos[torch.from_numpy(other)]
            labels = y[:, None].astype(np.uint8)
        arrays[f"{split}_images"] = _render(rng, signal, size)
        arrays[f"{split}_labels"] = labels
    return arrays


def synthesize(
    root: str | Path = "data/medmnist",
    datasets: str | Sequence[str] = "all",
    size: int = 28,
    per_class: int = 30,
    seed: int = 0,
    force: bool = False,
) -> list[Path]:
    """Write synthetic MedMNIST files (official names, keys, dtypes, shapes) under ``root``.

    Args:
        root: folder to write ``{flag}.npz`` / ``{flag}_{size}.npz`` into.
        datasets: a flag, a list of flags, or ``all``.
        size: image size, one of 28, 64, 128, 224.
        per_class: training images per class (val gets a quarter, test a half; at least 2 each).
        seed: random seed; the same seed writes the same files.
        force: overwrite existing files (never done otherwise).
    """
    flags = resolve_flags(datasets, option="--datasets")
    size = check_size(size, option="--size")
    if per_class < 2:
        raise ConfigError(f"--per-class: {per_class} is too few; use at least 2 so every split has every class.")
    root = Path(root)
    paths = [npz_path(root, flag, size) for flag in flags]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"--root: {existing[0]} already exists ({len(existing)} of {len(paths)} files); "
            f"pass --force to overwrite, or choose another --root."
        )
    root.mkdir(parents=True, exist_ok=True)
    for spec, path in zip(dataset_specs(flags), paths):
        with atomic_path(path) as tmp:  # an interrupted run never leaves a half-written file under the real name
            np.savez_compressed(tmp, **synth_dataset(spec, size, per_class, seed))
    print(
        f"wrote {len(paths)} SYNTHETIC MedMNIST-format files ({size} px, seed {seed}) under {root}: "
        f"generated patterns, not medical images — for offline trials and tests only"
    )
    return paths
