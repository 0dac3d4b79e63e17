"""Where evaluation results go: ``metrics.json`` in the run's log directory and a table on screen."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from vitask_pl.atomic import atomic_path, write_text


def flatten(results: dict, prefix: str) -> dict[str, float]:
    """``{dataset: {metric: v}}`` (possibly nested under modes) -> ``{"prefix/dataset/metric": v}``."""
    out = {}
    for key, value in results.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}/{key}"))
        elif key != "n":
            out[f"{prefix}/{key}"] = float(value)
    return out


def log_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir)


def write_json(path: Path, payload: dict | list) -> Path:
    """Write atomically, so an interrupted run never leaves a truncated file behind."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


# Column labels, in order; f1 is the macro average (eval/metrics.py), exact_match and invalid are generation's.
LABELS = {"acc": "ACC", "f1": "F1", "auc": "AUC", "exact_match": "EM", "invalid": "invalid"}


def _width(metric: str) -> int:
    return max(len(LABELS[metric]), 5) + 2  # "0.123" and two spaces


def format_table(results: dict) -> str:
    """One compact table of possibly nested results: a row per dataset then ``avg``, a column group per mode and
    protocol (ACC, macro-F1, AUC, ...) at 3 decimals, ``n`` last."""
    groups = []  # (title, {dataset: {metric: v}}, its metrics, its width)
    for title, table in tables(results):
        metrics = [m for m in LABELS if any(m in row for row in table.values())]
        # two more spaces between groups, so a group's title reads as its columns'
        groups.append((title, table, metrics, max(sum(map(_width, metrics)), len(title) + 1) + 2))
    names = [n for n in groups[0][1] if n != "avg"] + ["avg"]
    first = max(len(n) for n in [*names, "dataset"]) + 2

    def line(label: str, cells: list[list[str]], n: str) -> str:
        text = "".join(
            "".join(f"{c:>{_width(m)}}" for c, m in zip(texts, metrics)).rjust(span)
            for texts, (_, _, metrics, span) in zip(cells, groups)
        )
        return f"{label:<{first}}{text}{n:>7}"

    lines = [" " * first + "".join(f"{t:>{span}}" for t, _, _, span in groups)] if groups[0][0] else []
    lines.append(line("dataset", [[LABELS[m] for m in metrics] for _, _, metrics, _ in groups], "n"))
    for name in names:
        rows = [table.get(name, {}) for _, table, _, _ in groups]
        cells = [[f"{row[m]:.3f}" if m in row else "" for m in g[2]] for row, g in zip(rows, groups)]
        lines.append(line(name, cells, str(next((int(r["n"]) for r in rows if "n" in r), ""))))
    return "\n".join(lines)


def tables(results: dict, title: str = "") -> list[tuple[str, dict]]:
    """The per-dataset tables inside possibly nested results (``{mode: {protocol: table}}``), with their paths."""
    if "avg" in results:
        return [(title, results)]
    return [t for key, sub in results.items() for t in tables(sub, f"{title} {key}".strip())]


def publish(trainer: L.Trainer, results: dict, filename: str = "metrics.json") -> Path | None:
    """Write ``metrics.json`` on rank 0 and print its one table (the test subcommand leaves out Lightning's)."""
    if not trainer.is_global_zero:
        return None
    path = write_json(log_dir(trainer) / filename, results)
    print(format_table(results))
    print(f"metrics written to {path}")
    return path


def write_predictions(path: Path, rows: list[dict]) -> Path:
    """Per-sample predictions as CSV (columns: the union of the rows' keys, in first-seen order)."""
    import csv

    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
