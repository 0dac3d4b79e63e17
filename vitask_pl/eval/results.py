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


def write_json(path: Path, payload: dict) -> Path:
    """Write atomically, so an interrupted run never leaves a truncated file behind."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def format_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """A fixed-width text table: one row per dataset, then ``avg``."""
    columns = [c for c in ("acc", "f1", "auc", "exact_match", "invalid") if any(c in r for r in results.values())]
    lines = [title] if title else []
    lines.append(f"{'dataset':<16}" + "".join(f"{c:>12}" for c in columns) + f"{'n':>8}")
    for name, row in results.items():
        cells = "".join(f"{row[c]:>12.4f}" if c in row else f"{'':>12}" for c in columns)
        lines.append(f"{name:<16}{cells}{int(row.get('n', 0)):>8}")
    return "\n".join(lines)


def tables(results: dict, title: str = "") -> list[tuple[str, dict]]:
    """The per-dataset tables inside possibly nested results (``{mode: {protocol: table}}``), with their paths."""
    if "avg" in results:
        return [(title, results)]
    return [t for key, sub in results.items() for t in tables(sub, f"{title} {key}".strip())]


def publish(trainer: L.Trainer, results: dict, filename: str = "metrics.json") -> Path | None:
    """Write ``metrics.json`` on rank 0 and print each result table."""
    if not trainer.is_global_zero:
        return None
    path = write_json(log_dir(trainer) / filename, results)
    for title, table in tables(results):
        print(format_table(table, title=title))
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
