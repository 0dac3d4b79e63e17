"""What a run prints around the libraries vitask calls: their known noise dropped by message, progress as lines.

Each pattern names one line that every stage of ``make demo`` printed and that tells a vitask user nothing; a
warning or log line matching none of them still shows.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_module

# Matched from the start of the message, as `warnings.filterwarnings` does.
NOISY_WARNINGS = (
    # The pipeline runs each stage in-process with args=, so sys.argv always holds its own command line.
    re.escape("LightningCLI's args parameter is intended to run from within Python"),
    # Lightning's default logger falls back to CSV, which is what vitask reads (metrics.csv).
    re.escape("Starting from v1.9.0, `tensorboardX` has been removed"),
    # Lightning's own use of torch's pytree API, nothing a user can change.
    re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
    # The frozen VLM (and its vision tower) stays in eval mode on purpose; only the adapters train.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # The VLM stages write predictions.csv themselves, so predict_step returns nothing on purpose.
    re.escape("predict returned None if it was on purpose"),
)
NOISY_LOGS = (re.escape("💡 Tip: For seamless cloud logging"),)  # an advertisement, every trainer

EVERY_S = 30.0  # one progress line per this many seconds: readable in a CI log, nothing on the hot path


class _DropMatching(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


@contextmanager
def quiet() -> Iterator[None]:
    """Drop the known third-party lines while the block runs; every other warning and log line passes."""
    # Lightning's rank_zero_info/warn log through this one logger; a filter on an ancestor would not see its records.
    log = rank_zero_module.log
    drop = _DropMatching(NOISY_LOGS)
    with warnings.catch_warnings():
        for pattern in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        log.addFilter(drop)
        try:
            yield
        finally:
            log.removeFilter(drop)


def interactive() -> bool:
    """A person at a terminal gets a live bar; piped output and CI get lines (a bar there is one endless line)."""
    return sys.stdout.isatty() and os.environ.get("CI", "").lower() not in ("1", "true")


def lines_off_terminal(trainer: L.Trainer) -> None:
    """Swap Lightning's default bar for :class:`LineProgress` when nobody watches a terminal."""
    bar = trainer.progress_bar_callback
    if type(bar) in (RichProgressBar, TQDMProgressBar) and not interactive():
        trainer.callbacks[trainer.callbacks.index(bar)] = LineProgress()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def _value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LineProgress(ProgressBar):
    """One line at the first training step, then at most one every ``every_s`` seconds, and one when fit ends:
    ``epoch 3/40 step 120/920 train/loss 1.234 12 s eta 80 s``."""

    def __init__(self, every_s: float | None = None) -> None:
        super().__init__()
        self.every_s = EVERY_S if every_s is None else every_s
        self.enabled = True
        self._start = self._last = 0.0
        self._step0, self._total = 0, None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _due(self) -> bool:
        now = time.monotonic()
        if not self.enabled or now - self._last < self.every_s:
            return False
        self._last = now
        return True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._last = time.monotonic(), -math.inf  # the first step prints: the run is alive
        self._step0 = trainer.global_step  # a resumed fit's rate counts this process's steps only
        total = trainer.estimated_stepping_batches
        self._total = int(total) if math.isfinite(total) else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._due():
            self.print(self._fit_line(trainer, trainer.current_epoch + 1), flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:  # current_epoch now counts the finished epochs
            self.print(self._fit_line(trainer, trainer.current_epoch) + ", done", flush=True)

    def _fit_line(self, trainer: L.Trainer, epoch: int) -> str:
        elapsed, step = time.monotonic() - self._start, trainer.global_step
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {epoch}{epochs}", f"step {step}" + (f"/{self._total}" if self._total else "")]
        metrics = self.get_metrics(trainer, trainer.lightning_module)
        parts += [f"{k} {_value(v)}" for k, v in metrics.items() if k != "v_num"]
        parts.append(_duration(elapsed))
        if self._total and step > self._step0 and step < self._total:
            parts.append("eta " + _duration(elapsed / (step - self._step0) * (self._total - step)))
        return " ".join(parts)

    def _eval_line(self, stage: str, batch_idx: int, totals: list[int | float], dataloader_idx: int) -> None:
        if self._due():
            total = totals[dataloader_idx] if dataloader_idx < len(totals) else math.inf
            of = f"/{int(total)}" if math.isfinite(total) else ""
            self.print(f"{stage} batch {batch_idx + 1}{of} {_duration(time.monotonic() - self._start)}", flush=True)

    def _eval_start(self) -> None:
        if not self._start:  # standalone validate/test/predict; inside fit the clock and throttle carry on
            self._start = self._last = time.monotonic()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._eval_line("validation", batch_idx, trainer.num_val_batches, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_line("test", batch_idx, trainer.num_test_batches, dataloader_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_line("predict", batch_idx, trainer.num_predict_batches, dataloader_idx)
