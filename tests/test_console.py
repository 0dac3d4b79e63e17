"""What a run prints: the libraries' known noise filtered by message, progress as lines off a terminal, one table."""

import io
import logging
import re
import sys
import warnings
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_module, rank_zero_warn

from vitask_pl import console
from vitask_pl.cli import build_cli
from vitask_pl.eval.results import format_table

from .conftest import stage_configs

NOISE = [
    "LightningCLI's args parameter is intended to run from within Python",
    "Starting from v1.9.0, `tensorboardX` has been removed",
    "💡 Tip: For seamless cloud logging",
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "module(s) in eval mode",
    "predict returned None if it was on purpose",
    "Test metric",  # the header of Lightning's own test table
]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_known_noise_is_dropped_and_a_real_warning_still_shows():
    records = _Records()
    rank_zero_module.log.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with console.quiet():
                rank_zero_warn("Found 79 module(s) in eval mode at the start of training. This may lead to ...")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
                rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing ...")
                rank_zero_warn("predict returned None if it was on purpose, ignore this warning...")
                rank_zero_warn("Found 3 NaN values in the batch")  # same library, same words nearby: a real one
                rank_zero_info("Restoring states from the checkpoint path at x.ckpt")
            rank_zero_info("💡 Tip: For seamless cloud logging, outside the block")  # the filter went with it
    finally:
        rank_zero_module.log.removeHandler(records)
    assert [str(w.message) for w in seen] == ["Found 3 NaN values in the batch"]
    assert records.messages == [
        "Restoring states from the checkpoint path at x.ckpt",
        "💡 Tip: For seamless cloud logging, outside the block",
    ]


def test_one_table_per_dataset_with_a_column_group_per_mode_and_protocol():
    def scores(acc: float) -> dict:
        return {
            "dermamnist": {"acc": acc, "f1": 0.25, "auc": 0.6123, "n": 8},
            "avg": {"acc": acc, "f1": 0.25, "auc": 0.6123, "n": 8},
        }

    generated = {"dermamnist": {"acc": 0.5, "f1": 0.5, "invalid": 0.125, "n": 8}}
    generated["avg"] = generated["dermamnist"]
    lines = format_table({"wo_ep": {"score": scores(0.12345), "generate": generated}, "w_ep": {"score": scores(1.0)}})
    lines = lines.splitlines()
    assert lines[0].split() == ["wo_ep", "score", "wo_ep", "generate", "w_ep", "score"]
    assert lines[1].split() == ["dataset", "ACC", "F1", "AUC", "ACC", "F1", "invalid", "ACC", "F1", "AUC", "n"]
    assert lines[2].split() == ["dermamnist", "0.123", "0.250", "0.612", "0.500", "0.500", "0.125", "1.000"] + [
        "0.250",
        "0.612",
        "8",
    ]
    assert lines[3].startswith("avg") and len(lines) == 4


def _fit_args(root: Path, out: Path) -> list[str]:
    return [
        *stage_configs("tsm"),
        "--data.root",
        str(root),
        "--data.datasets",
        "[dermamnist,pneumoniamnist]",
        "--data.max_samples",
        "16",
        "--data.batch_size",
        "8",
        "--data.num_workers",
        "0",
        "--model.init_args.backbone",
        "vit_tiny_patch16_224",
        "--model.init_args.backbone_kwargs",
        "{patch_size: 7, depth: 1, embed_dim: 32, num_heads: 2}",
        "--trainer.max_epochs",
        "2",
        "--trainer.log_every_n_steps",
        "50",  # more than an epoch's 4 steps: Lightning warns, a real warning the filters must let through
        "--trainer.enable_progress_bar",
        "true",
        "--trainer.default_root_dir",
        str(out),
    ]


def test_fit_and_test_print_progress_lines_and_one_table_and_no_noise(capfd, monkeypatch, synth_root, tmp_path):
    monkeypatch.setattr(sys, "argv", ["vitask", "pipeline", "--config", "x.yaml"])  # as under `vitask pipeline`
    monkeypatch.delenv("CI", raising=False)  # captured stdout is not a TTY: that alone must give lines
    monkeypatch.setattr(console, "EVERY_S", 0.0)  # a line per step, so a short fit shows the periodic ones
    args = _fit_args(synth_root, tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_cli(["fit", *args])
        build_cli(["test", *args, "--ckpt_path", str(tmp_path / "checkpoints/last.ckpt")])
    out, err = capfd.readouterr()
    printed = out + err + "\n".join(str(w.message) for w in seen)
    assert [line for line in NOISE if line in printed] == []
    assert any("smaller than the logging interval" in str(w.message) for w in seen)
    steps = re.findall(r"^epoch (\d)/2 step (\d+)/8 train/loss \d", out, re.M)
    assert len(steps) >= 8 and steps[-1] == ("2", "8"), out
    assert re.search(r"^epoch 2/2 step 8/8 .*, done$", out, re.M)
    assert re.search(r"^validation batch \d+/\d+ ", out, re.M)
    table = out[out.index("dataset ") :].splitlines()
    assert table[0].split() == ["dataset", "ACC", "F1", "AUC", "n"]
    assert [row.split()[0] for row in table[1:4]] == ["dermamnist", "pneumoniamnist", "avg"]
    assert all(re.fullmatch(r"\d\.\d{3}", cell) for row in table[1:4] for cell in row.split()[1:4])
    assert out.count("dataset ") == 1  # once per test run

    build_cli(["test", *args, "--ckpt_path", str(tmp_path / "checkpoints/last.ckpt"), "--verbose", "true"])
    assert "Test metric" in capfd.readouterr().out  # Lightning's table is one option away, and the check above bites


@pytest.mark.parametrize(
    ("tty", "ci", "bar"),
    [
        (True, None, (RichProgressBar, TQDMProgressBar)),
        (True, "true", (console.LineProgress,)),
        (False, None, (console.LineProgress,)),
    ],
)
def test_a_bar_on_a_terminal_lines_elsewhere(tty, ci, bar, monkeypatch, synth_root, tmp_path):
    class Stdout(io.StringIO):
        def isatty(self) -> bool:
            return tty

    monkeypatch.setattr(sys, "stdout", Stdout())
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    cli = build_cli(_fit_args(synth_root, tmp_path), run=False)
    assert type(cli.trainer.progress_bar_callback) in bar  # Lightning picks Rich when it is installed
    assert (
        sum(isinstance(c, (RichProgressBar, TQDMProgressBar, console.LineProgress)) for c in cli.trainer.callbacks) == 1
    )
