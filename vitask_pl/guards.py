"""Stop a run early, with one clear line, instead of losing work later.

Before training: the output folder must be writable and hold room for the checkpoints, and a fresh run must not
write over an earlier run's checkpoints. During training: a NaN/inf loss stops the run before the update it
would poison, so the last checkpoint on disk stays the last good one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import lightning as L
import torch

from vitask_pl.errors import ConfigError, UserError

MARGIN_BYTES = 64 << 20  # logs, metrics, the temporary copy of a small checkpoint


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite."""


def last_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    return sorted(ckpt_dir.glob("last*.ckpt")) if ckpt_dir.is_dir() else []


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """What one checkpoint of ``module`` takes: the trained weights plus AdamW's two moments, in fp32.

    Stage checkpoints keep only what trains (LoRA, connector); the TSM trains everything.
    """
    return sum(3 * 4 * p.numel() for p in module.parameters() if p.requires_grad)


def check_output_dir(ckpt_dir: str | Path, *, need_bytes: int, option: str = "--trainer.default_root_dir") -> None:
    """Prove ``ckpt_dir`` writable with a probe file, then require ``need_bytes`` free on its disk.

    Folders made for the probe are removed again: a run that fails later (a bad dataset, say) leaves nothing.
    """
    ckpt_dir = Path(ckpt_dir).absolute()
    made = [p for p in (ckpt_dir, *ckpt_dir.parents) if not p.exists()]
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"0")
        finally:
            probe.unlink(missing_ok=True)
        free = shutil.disk_usage(ckpt_dir).free
    except OSError as err:
        raise ConfigError(
            f"{option}: cannot write checkpoints to {ckpt_dir} ({err.strerror or err}); pass a writable folder."
        ) from err
    finally:
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
    if free < need_bytes:
        raise ConfigError(
            f"{option}: {ckpt_dir} has {free / 2**20:.0f} MiB free but this run needs about {need_bytes / 2**20:.0f} "
            f"MiB for its checkpoints; free space or pass a folder on a larger disk."
        )


def refuse_fresh_over_earlier(ckpt_dir: str | Path, ckpt_path: str | None) -> None:
    """A fresh ``fit`` into a folder with an earlier run's checkpoints would overwrite them: refuse. And ``last``
    with nothing to resume is a mistake too (Lightning would warn and silently start from scratch)."""
    earlier = last_checkpoints(ckpt_dir)
    if ckpt_path == "last" and not earlier:
        raise ConfigError(
            f"--ckpt_path last: {ckpt_dir} holds no last.ckpt to resume; check "
            f"--trainer.default_root_dir, or drop --ckpt_path to start afresh."
        )
    if ckpt_path is None and earlier:
        raise ConfigError(
            f"--trainer.default_root_dir: {Path(ckpt_dir).parent} already holds an earlier run's checkpoint "
            f"{earlier[-1]}; resume it with --ckpt_path last, or start afresh in another --trainer.default_root_dir."
        )


class FiniteLoss(L.Callback):
    """Raise :class:`NonFiniteLossError` before ``backward`` of a NaN/inf loss; no update, no checkpoint follows.

    Every rank votes, so a NaN on one rank stops all of them together instead of hanging the others.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        kept = [str(p) for cb in trainer.checkpoint_callbacks for p in last_checkpoints(cb.dirpath or "")]
        where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"training loss is {loss.detach().float().cpu().tolist() if loss.numel() == 1 else 'not finite'} at step "
            f"{trainer.global_step} (epoch {trainer.current_epoch}); the run stopped before that update and "
            f"{where}. Lower --model.init_args.optimizer.init_args.lr or use --trainer.precision bf16-mixed "
            f"rather than 16-mixed, then resume with --ckpt_path last."
        )
