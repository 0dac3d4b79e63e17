"""``vitask report RUN_DIR``: results.json, report.md and PNG plots from a pipeline's stage outputs.

Everything here is recomputed from what the stages wrote (``done.json``, ``metrics.json``, ``metrics.csv``,
``predictions.csv``, ``contrast.pt``), so the report can be regenerated at any time without re-running.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from vitask_pl.atomic import atomic_path, write_text
from vitask_pl.data.catalog import FLAGS
from vitask_pl.errors import MissingFileError
from vitask_pl.stages import STAGES

# (row label, stage, metrics key, mode, protocol): the paper's Table 1 rows, then extras.
ROWS = [
    ("TSM", "tsm", "metrics", None, None),
    ("Vanilla IT", "vanilla", "metrics", "wo_ep", "score"),
    ("VITask w/o EP", "rda_crt", "metrics", "wo_ep", "score"),
    ("VITask w/ EP", "rda_crt", "metrics", "w_ep", "score"),
    ("Stage 1 (EP) w/o EP", "ep", "metrics", "wo_ep", "score"),
    ("Stage 1 (EP) w/ EP", "ep", "metrics", "w_ep", "score"),
    ("Ablation: RDA only, w/o EP", "rda_only", "metrics", "wo_ep", "score"),
    ("Ablation: CRT only, w/o EP", "crt_only", "metrics", "wo_ep", "score"),
    # The paper's Fig. 4: trained and tested without the label list (paired with the vanilla row trained so).
    ("Vanilla IT, trained and tested incomplete", "vanilla_incomplete", "metrics", "wo_ep", "score"),
    ("VITask w/o EP, trained and tested incomplete", "rda_crt_incomplete", "metrics", "wo_ep", "score"),
    # Trained on complete instructions, tested on incomplete ones.
    ("Vanilla IT, trained complete, tested incomplete", "vanilla", "metrics_incomplete", "wo_ep", "score"),
    ("VITask w/o EP, trained complete, tested incomplete", "rda_crt", "metrics_incomplete", "wo_ep", "score"),
]
# Each row's paired baseline (same seed): vanilla IT trained the same way.
BASELINES = {
    "VITask w/o EP, trained and tested incomplete": "Vanilla IT, trained and tested incomplete",
    "VITask w/o EP, trained complete, tested incomplete": "Vanilla IT, trained complete, tested incomplete",
}
PROBES = {"features": "Probe ceiling: VLM frozen image features", "pixels": "Probe: pixels"}
VALID_RATIO = 0.8  # vanilla IT below this fraction of its probe ceiling is a crippled baseline
UNLISTED = "Vanilla IT, trained and tested incomplete"
GENERATE_ROWS = [
    ("Vanilla IT", "vanilla", "wo_ep"),
    ("VITask w/o EP", "rda_crt", "wo_ep"),
    ("VITask w/ EP", "rda_crt", "w_ep"),
]
# The paper's Table 1, 12-dataset averages on the real test sets (ACC, macro-F1).
PAPER = {
    "TSM (ViT-B)": (0.816, 0.772),
    "LLaVA-1.5-13B vanilla IT": (0.759, 0.624),
    "InternVL2-2B vanilla IT": (0.742, 0.604),
    "VITask w/o EP (InternVL2-2B)": (0.806, 0.710),
    "VITask w/ EP (InternVL2-2B)": (0.847, 0.771),
}
METRICS = ("acc", "f1", "auc")
# VITask^plug on an external set (the paper's Table 3): (row label, record key, mode); the plugged TSM's own test
# comes from its stage record. None of the rows re-tunes the VLM or the connector.
PLUG_ROWS = [
    ("Vanilla IT", "metrics_vanilla", "wo_ep"),
    ("VITask w/o EP", "metrics", "wo_ep"),
    ("VITask w/ EP, original TSM", "metrics", "w_ep"),
    ("VITask^plug: w/ EP, TSM trained on it", "metrics_plugged", "w_ep"),
]
PLUG_TSM_ROW = "TSM trained on it"
PLUG_TSM = "plug_tsm"  # the pipeline's run of that TSM is `plug_tsm_<name>`; its overrides are `stages.plug_tsm`
# The paper's Table 3, APTOS (ACC): what the external-validation rows are compared with.
PAPER_PLUG = {"VITask (APTOS)": 0.456, "VITask^plug (APTOS)": 0.668}


def _table(record: dict, key: str, mode, protocol) -> dict | None:
    path = record.get(key)
    if not path or not Path(path).is_file():
        return None
    data = json.loads(Path(path).read_text())
    return data if mode is None else data.get(mode, {}).get(protocol)


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def collect(run_dir: Path) -> tuple[dict, dict]:
    """``(results, records)``: every row's per-dataset metrics over seeds, and the stage records per seed."""
    seeds = sorted(p for p in run_dir.glob("seed*") if p.is_dir())
    if not seeds:
        raise MissingFileError(f"RUN_DIR: {run_dir} holds no seed*/ folders; run `vitask pipeline` first.")
    records = {s.name: {p.parent.name: json.loads(p.read_text()) for p in s.glob("*/done.json")} for s in seeds}
    per_seed: dict[str, dict[str, dict]] = {}  # row -> seed -> per-dataset metrics
    for label, stage, key, mode, protocol in ROWS:
        tables = {seed: t for seed, r in records.items() if stage in r and (t := _table(r[stage], key, mode, protocol))}
        if tables:
            per_seed[label] = tables
    for kind, label in PROBES.items():
        tables = {
            s.name: json.loads(p.read_text())[kind] for s in seeds if (p := s / "probe" / "probes.json").is_file()
        }
        if tables:
            per_seed[label] = tables
    rows = {label: _summarise(list(tables.values())) for label, tables in per_seed.items()}
    generate = {}
    for label, stage, mode in GENERATE_ROWS:
        tables = [t for r in records.values() if stage in r and (t := _table(r[stage], "metrics", mode, "generate"))]
        if tables:
            generate[label] = {
                ds: {m: _mean_std([t[ds][m] for t in tables]) for m in ("acc", "f1", "invalid")} for ds in tables[0]
            }
    return {"rows": rows, "generate": generate, "paired": _paired(per_seed), "plug": _plug(records)}, records


def _plug(records: dict) -> dict:
    """``{external set: {row: {metric: mean ± std}}}`` of the VITask^plug runs, over seeds."""
    out: dict[str, dict[str, list[dict]]] = {}
    for recs in records.values():
        for record in recs.values():
            if record.get("stage") != "plug":
                continue
            name, rows = record["dataset"], out.setdefault(record["dataset"], {})
            for label, key, mode in PLUG_ROWS:
                if (table := _table(record, key, mode, "score")) is not None:
                    rows.setdefault(label, []).append(table[name])
            tsm = recs.get(f"{PLUG_TSM}_{name}")
            if tsm and (table := _table(tsm, "metrics", None, None)) is not None:
                rows.setdefault(PLUG_TSM_ROW, []).append(table[name])
    return {
        name: {
            label: {m: _mean_std([t[m] for t in tables]) for m in METRICS if m in tables[0]}
            for label, tables in rows.items()
        }
        for name, rows in out.items()
    }


def _plug_section(plug: dict, seeds: int) -> list[str]:
    if not plug:
        return []
    lines = [
        "",
        "## External validation: VITask^plug (the paper's Table 3)",
        "",
        "The tuned models on an imported external set that shares a tuned dataset's label space, none re-tuned: "
        "the VLM alone, with the exemplar of the original TSM, and with the exemplar of a TSM trained on the "
        "external set plugged into the same connector. Paper, APTOS ACC: "
        + ", ".join(f"{k} {v:.3f}" for k, v in PAPER_PLUG.items())
        + ".",
    ]
    for name, rows in plug.items():
        lines += ["", f"**{name}**", "", "| model | ACC | macro-F1 | AUC |", "|---|---|---|---|"]
        for label, cells in rows.items():
            lines.append(f"| {label} | " + " | ".join(_fmt(cells.get(m), seeds) for m in METRICS) + " |")
    return lines


def _summarise(tables: list[dict]) -> dict:
    """Per-dataset mean ± std over seeds of every metric the first table has."""
    return {
        ds: {m: _mean_std([t[ds][m] for t in tables]) for m in (*METRICS, "exact_match") if m in tables[0][ds]}
        for ds in tables[0]
    }


def _paired(per_seed: dict[str, dict[str, dict]]) -> dict:
    """Each model row minus its baseline on the same seed (average ACC and macro-F1): a paired comparison."""
    out = {}
    for label, tables in per_seed.items():
        base = BASELINES.get(label, "Vanilla IT")
        if label == base or label in PROBES.values() or base not in per_seed:
            continue
        common = sorted(set(tables) & set(per_seed[base]))
        if common:
            out[label] = {"baseline": base, "seeds": common} | {
                m: _mean_std([tables[s]["avg"][m] - per_seed[base][s]["avg"][m] for s in common]) for m in ("acc", "f1")
            }
    return out


def _fmt(cell: dict | None, seeds: int) -> str:
    if cell is None:
        return "–"
    return f"{cell['mean']:.3f} ± {cell['std']:.3f}" if seeds > 1 else f"{cell['mean']:.3f}"


def _plots(run_dir: Path, results: dict, records: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    first = records[sorted(records)[0]]

    # 1. per-dataset accuracy, one bar per model
    main = [r for r in ("TSM", "Vanilla IT", "VITask w/o EP", "VITask w/ EP") if r in results["rows"]]
    datasets = [d for d in FLAGS if d in results["rows"][main[0]]]
    fig, ax = plt.subplots(figsize=(14, 4.5))
    width = 0.8 / len(main)
    for i, row in enumerate(main):
        means = [results["rows"][row][d]["acc"]["mean"] for d in datasets]
        stds = [results["rows"][row][d]["acc"]["std"] for d in datasets]
        ax.bar(np.arange(len(datasets)) + i * width, means, width, yerr=stds, label=row)
    ax.set_xticks(np.arange(len(datasets)) + 0.4 - width / 2, [d.replace("mnist", "") for d in datasets], rotation=30)
    ax.set_ylabel("test accuracy (score protocol)")
    ax.set_ylim(0, 1)
    ax.legend(ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    written.append(_save(fig, run_dir / "per_dataset_accuracy.png"))

    # 2. confusion matrices of the single-label datasets, VLM alone (score protocol), vanilla vs VITask
    for stage, title in (("vanilla", "Vanilla IT"), ("rda_crt", "VITask w/o EP")):
        if stage not in first or "predictions" not in first[stage]:
            continue
        rows = [r for r in csv.DictReader(open(first[stage]["predictions"])) if r["mode"] == "wo_ep"]
        flags = [d for d in datasets if d != "chestmnist" and any(r["dataset"] == d for r in rows)]
        cols = 4
        fig, axes = plt.subplots(
            (len(flags) + cols - 1) // cols, cols, figsize=(3.2 * cols, 3 * ((len(flags) + cols - 1) // cols))
        )
        for ax, flag in zip(np.atleast_1d(axes).ravel(), flags):
            sub = [r for r in rows if r["dataset"] == flag]
            names = [k[2:-1] for k in sub[0] if k.startswith("p[") and sub[0][k] != ""]
            matrix = np.zeros((len(names), len(names)))
            for r in sub:
                matrix[names.index(r["label"]), names.index(r["prediction"])] += 1
            ax.imshow(matrix / matrix.sum(1, keepdims=True).clip(min=1), vmin=0, vmax=1, cmap="Blues")
            ax.set_title(flag.replace("mnist", ""), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in np.atleast_1d(axes).ravel()[len(flags) :]:
            ax.axis("off")
        fig.suptitle(f"{title}: confusion (rows: true class, columns: predicted; row-normalised)")
        fig.tight_layout()
        written.append(_save(fig, run_dir / f"confusion_{stage}.png"))

    # 3. the paper's Fig. 3 analogue: mean response-token probability, own image vs a different-label image
    import torch

    panels = [
        (s, t)
        for s, t in (("vanilla", "Vanilla IT"), ("ep", "Stage 1 (before CRT)"), ("rda_crt", "Stage 2 (after CRT)"))
        if s in first and "contrast" in first[s]
    ]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), sharey=True)
        for ax, (stage, title) in zip(np.atleast_1d(axes), panels):
            data = torch.load(first[stage]["contrast"], weights_only=True)
            bins = np.linspace(0, 1, 31)
            ax.hist(data["pos"].numpy(), bins=bins, alpha=0.6, density=True, label="own image")
            ax.hist(data["neg"].numpy(), bins=bins, alpha=0.6, density=True, label="different-label image")
            gap = float((data["pos"] - data["neg"]).mean())
            ax.set_title(f"{title}\nmean gap {gap:+.3f}", fontsize=10)
            ax.set_xlabel("mean response-token probability")
        np.atleast_1d(axes)[0].set_ylabel("density")
        np.atleast_1d(axes)[0].legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, run_dir / "crt_density.png"))

    # 4. training curves of each loss term
    stages = [
        s for s in ("tsm", "vanilla", "ep", "rda_crt") if s in first and Path(first[s].get("train_log", "")).is_file()
    ]
    if not stages:  # no stage logged a training step (runs shorter than the logging interval)
        return written
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.3))
    for ax, stage in zip(np.atleast_1d(axes), stages):
        log = list(csv.DictReader(open(first[stage]["train_log"])))
        terms = [k for k in (log[0].keys() if log else []) if k.startswith("train/")]
        for term in terms:
            points = [(int(r["step"]), float(r[term])) for r in log if r.get(term)]
            if points:
                ax.plot(*zip(*points), label=term.removeprefix("train/"))
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, run_dir / "training_curves.png"))
    return written


def _reading(results: dict, records: dict) -> list[str]:
    """Plain statements of the measured response-probability gaps (the differences against vanilla are the
    paired table's); no judgement beyond the numbers."""
    import torch

    out = []
    first = records[sorted(records)[0]]
    for stage in ("ep", "rda_crt"):
        name = STAGES[stage].title
        if stage in first and "contrast" in first[stage]:
            data = torch.load(first[stage]["contrast"], weights_only=True)
            gap = float((data["pos"] - data["neg"]).mean())
            out.append(
                f"- Mean response-token probability, own image minus a different-label image, after {name}: {gap:+.4f}."
            )
    return out


def _validity(results: dict, seeds: int) -> list[str]:
    """Can this run tell whether a method works? The baseline against the ceiling of its own frozen features."""
    rows = results["rows"]
    probe, vanilla = rows.get(PROBES["features"]), rows.get("Vanilla IT")
    if probe is None or vanilla is None:
        return []
    # Beside the baseline, the same vanilla IT trained on instructions without the label list: whether the
    # listed options are what holds it back (README, "The baseline against its ceiling").
    shown = [r for r in (*PROBES.values(), "TSM", "Vanilla IT", UNLISTED) if r in rows]
    lines = [
        "",
        "## Is the testbed valid?",
        "",
        f"A baseline far below the linear-probe ceiling of its own frozen image features is crippled: any "
        f"difference then measures how fast it learns, not the method. Target: vanilla IT ≥ {VALID_RATIO} × the "
        f"ceiling on average.",
        "",
        "| dataset | " + " | ".join(shown) + " | vanilla / ceiling |",
        "|---" * (2 + len(shown)) + "|",
    ]
    for ds in (*(d for d in FLAGS if d in probe), "avg"):
        cells = [_fmt(rows[r].get(ds, {}).get("acc"), seeds) for r in shown]
        ratio = vanilla[ds]["acc"]["mean"] / max(probe[ds]["acc"]["mean"], 1e-9) if ds in vanilla else float("nan")
        lines.append(f"| {ds.replace('mnist', '')} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    ratio = vanilla["avg"]["acc"]["mean"] / max(probe["avg"]["acc"]["mean"], 1e-9)
    verdict = "meets" if ratio >= VALID_RATIO else "is BELOW"
    lines += [
        "",
        f"On average vanilla IT reaches **{ratio:.2f} ×** the ceiling ({vanilla['avg']['acc']['mean']:.3f} vs "
        f"{probe['avg']['acc']['mean']:.3f} ACC), which {verdict} the {VALID_RATIO} × target.",
    ]
    if ratio < VALID_RATIO:
        lines.append("Read the VITask rows below as measurements of this testbed, not of the method.")
    return lines


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path.name


def _models(records: dict) -> dict:
    first = records[sorted(records)[0]]
    out = {}
    for stage, record in first.items():
        cfg = Path(record["metrics"]).parent / "config.yaml"
        if cfg.is_file():
            import yaml

            conf = yaml.safe_load(cfg.read_text())
            init = conf.get("model", {}).get("init_args", {})
            data = conf.get("data", {}).get("init_args", {})
            out[stage] = {
                "model": init.get("vlm") or init.get("backbone"),
                "root": data.get("root"),
                "datasets": data.get("datasets"),
                "size": data.get("size"),
                "max_samples": data.get("max_samples"),
                "epochs": conf.get("trainer", {}).get("max_epochs"),
            }
    return out


def report(run_dir: str) -> Path:
    """Regenerate ``results.json``, ``report.md`` and the plots of a pipeline run directory.

    Args:
        run_dir: a ``vitask pipeline`` run directory, e.g. ``runs/demo``.
    """
    root = Path(run_dir)
    results, records = collect(root)
    meta = json.loads((root / "pipeline.json").read_text()) if (root / "pipeline.json").is_file() else {}
    models = _models(records)
    plots = _plots(root, results, records)
    n_seeds = len(records)
    payload = {
        "run": str(root),
        "seeds": sorted(records),
        "synthetic": meta.get("synthetic"),
        "models": models,
        "wall_time_s": {s: {k: r.get("wall_time_s") for k, r in recs.items()} for s, recs in records.items()},
        **results,
        "paper_table1_avg": {k: {"acc": a, "f1": f} for k, (a, f) in PAPER.items()},
    }
    write_text(root / "results.json", json.dumps(payload, indent=2) + "\n")

    synthetic = meta.get("synthetic", True)
    lines = [f"# VITask results — `{root}`", ""]
    lines += [
        f"- **Data**: {'SYNTHETIC MedMNIST-format data (generated patterns, not medical images)' if synthetic else 'MedMNIST'}"
        f" from `{models.get('tsm', {}).get('root')}`, {models.get('tsm', {}).get('size')} px, datasets "
        f"{models.get('tsm', {}).get('datasets')}, at most {models.get('vanilla', {}).get('max_samples') or 'all'} samples per dataset and split for the VLM stages.",
        f"- **Models**: TSM `{models.get('tsm', {}).get('model')}`; VLM `{models.get('vanilla', {}).get('model')}`.",
        f"- **Seeds**: {', '.join(sorted(records))}" + (" (mean ± std over seeds)" if n_seeds > 1 else ""),
        "- **Wall time per stage** (s, first seed): "
        + ", ".join(f"{s} {sum(v.values()):.0f}" for s, v in payload["wall_time_s"][sorted(records)[0]].items() if v),
        f"- **Whole pipeline**: {meta.get('wall_time_s', 0):.0f} s" if meta else "",
        "",
        "## Test results, average over the datasets (score protocol: class probabilities from candidate likelihoods)",
        "",
        "| model | ACC | macro-F1 | AUC |",
        "|---|---|---|---|",
    ]
    for label, table in results["rows"].items():
        avg = table.get("avg", {})
        lines.append(
            f"| {label} | {_fmt(avg.get('acc'), n_seeds)} | {_fmt(avg.get('f1'), n_seeds)} | {_fmt(avg.get('auc'), n_seeds)} |"
        )
    lines += _validity(results, n_seeds)
    lines += ["", "### Per dataset, ACC", ""]
    datasets = [d for d in (*FLAGS, "avg") if any(d in t for t in results["rows"].values())]
    lines += [
        "| model | " + " | ".join(d.replace("mnist", "") for d in datasets) + " |",
        "|---" * (len(datasets) + 1) + "|",
    ]
    for label, table in results["rows"].items():
        lines.append(f"| {label} | " + " | ".join(_fmt(table.get(d, {}).get("acc"), n_seeds) for d in datasets) + " |")
    if results["paired"]:
        lines += [
            "",
            "## Paired differences against vanilla IT (same seed; average over the datasets)",
            "",
            "| model | baseline | Δ ACC | Δ macro-F1 | Δ ACC per seed |",
            "|---|---|---|---|---|",
        ]
        for label, d in results["paired"].items():
            each = ", ".join(f"{v:+.3f}" for v in d["acc"]["values"])
            lines.append(
                f"| {label} | {d['baseline']} | {d['acc']['mean']:+.3f} ± {d['acc']['std']:.3f} | "
                f"{d['f1']['mean']:+.3f} ± {d['f1']['std']:.3f} | {each} |"
            )
    if results["generate"]:
        lines += [
            "",
            "## Generation protocol (greedy decoding, exact match), average",
            "",
            "| model | ACC | macro-F1 | invalid answers |",
            "|---|---|---|---|",
        ]
        for label, table in results["generate"].items():
            avg = table["avg"]
            lines.append(
                f"| {label} | {_fmt(avg['acc'], n_seeds)} | {_fmt(avg['f1'], n_seeds)} | {_fmt(avg['invalid'], n_seeds)} |"
            )
    lines += _plug_section(results["plug"], n_seeds)
    lines += ["", "## Reading", ""] + _reading(results, records)
    lines += [
        "",
        "## For comparison: the paper's Table 1 (real MedMNIST test sets, real models, 12-dataset average)",
        "",
        "These are **the paper's numbers**, not ours: what a full run on real data with InternVL2-2B should approach.",
        "",
        "| paper row | ACC | macro-F1 |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {a:.3f} | {f:.3f} |" for k, (a, f) in PAPER.items()]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += [
        "",
        "ChestMNIST `acc` is MedMNIST's per-label accuracy; the confusion matrices leave it out (multi-label).",
    ]
    write_text(root / "report.md", "\n".join(line for line in lines if line is not None) + "\n")
    print(f"report: {root / 'report.md'} (results.json and {len(plots)} plots beside it)")
    return root / "report.md"
