"""``vitask pipeline``: the whole method under one run directory.

TSM -> vanilla instruction tuning (baseline) -> stage 1 (EP) -> stage 2 (RDA+CRT) [-> ablations], each a
``vitask fit`` followed by its evaluations (``test`` in every mode and protocol, ``predict``, the
incomplete-instruction test, and the positive/negative response probabilities of Fig. 3). Checkpoints chain
automatically. A finished stage leaves ``done.json``; a stage whose ``done.json`` and files exist is skipped,
so an interrupted pipeline continues where it stopped. ``--seeds N`` repeats it and the report gives mean ± std.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from vitask_pl.atomic import save_torch, write_text
from vitask_pl.cli import build_cli
from vitask_pl.data.catalog import FLAGS
from vitask_pl.data.files import npz_path
from vitask_pl.data.synth import synthesize
from vitask_pl.errors import ConfigError
from vitask_pl.eval.contrast import response_probabilities
from vitask_pl.eval.probe import pixels, probe_table, vlm_image_features
from vitask_pl.fingerprint import check, load
from vitask_pl.guards import last_checkpoints
from vitask_pl.jobs import Unit, run_units
from vitask_pl.models.vlm import resolve_source
from vitask_pl.report import PLUG_TSM, report
from vitask_pl.stages import STAGES

# Each run of the pipeline is one stage of vitask_pl.stages (its config) with overrides, and its evaluations.
RUNS = {  # run -> (stage, evaluations after fit)
    "tsm": ("tsm", ()),
    "vanilla": ("vanilla", ("predict", "incomplete", "contrast")),
    "ep": ("ep", ("predict", "contrast")),
    "rda_crt": ("rda_crt", ("predict", "incomplete", "contrast")),
    "rda_only": ("rda_crt", ()),
    "crt_only": ("rda_crt", ()),
    # The paper's incomplete-instruction experiment (Fig. 4): trained *and* tested without the label list.
    "vanilla_incomplete": ("vanilla", ()),
    "ep_incomplete": ("ep", ()),
    "rda_crt_incomplete": ("rda_crt", ()),
}
ABLATIONS = {"rda_only": {"model.init_args.objective.beta": 0}, "crt_only": {"model.init_args.objective.alpha": 0}}
INCOMPLETE = ("vanilla_incomplete", "ep_incomplete", "rda_crt_incomplete")
# What each VITask stage starts from and whose step budget it shares (see `match_vanilla_steps`).
INIT_FROM = {"rda_crt": "ep", "rda_only": "ep", "crt_only": "ep", "rda_crt_incomplete": "ep_incomplete"}
BASELINE = {s: "vanilla_incomplete" if s in INCOMPLETE else "vanilla" for s in RUNS}
FIRST_HALF = ("ep", "ep_incomplete")  # stage 1 takes half of the baseline's steps, stage 2 (and ablations) the rest


def cli_args(overrides: dict) -> list[str]:
    """``{"trainer.max_epochs": 2}`` -> ``["--trainer.max_epochs", "2"]`` (lists, dicts and ``None`` as JSON)."""
    args = []
    for key, value in overrides.items():
        if value is None:
            value = "null"  # str(None) would reach the parser as the string "None"
        elif isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, dict)):
            value = json.dumps(value)
        args += [f"--{key}", str(value)]
    return args


def _run(args: list[str], run: bool = True):

    return build_cli(args, run=run)


def _valid(record_path: Path) -> dict | None:
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    files = [record.get("checkpoint"), record.get("metrics"), *record.get("files", [])]
    return record if all(f and Path(f).exists() for f in files) else None


def run_stage(
    name: str,
    seed_dir: Path,
    config_args: list[str],
    overrides: dict,
    seed: int,
    best: bool,
    evaluations: tuple[str, ...] | None = None,
) -> dict:
    """Fit one stage, evaluate it (at its best validation checkpoint if ``best``, else where training ended), and
    record what it produced in ``done.json``; skip if already done. ``evaluations`` default to ``RUNS[name]``'s."""
    stage_dir = seed_dir / name
    record_path = stage_dir / "done.json"
    if (record := _valid(record_path)) is not None:
        print(f"[pipeline] {seed_dir.name}/{name}: done earlier, skipped ({record_path})")
        return record
    evaluations = RUNS[name][1] if evaluations is None else evaluations
    base = [
        *config_args,
        *cli_args(overrides),
        "--trainer.default_root_dir",
        str(stage_dir),
        "--seed_everything",
        str(seed),
    ]
    times, record = {}, {"stage": name, "seed": seed, "files": []}
    resume = last_checkpoints(stage_dir / "checkpoints")  # a killed fit continues, bit-identically
    print(f"[pipeline] {seed_dir.name}/{name}: fit" + (f", resuming from {resume[-1]}" if resume else ""))
    start = time.monotonic()
    fit = _run(["fit", *base, *(["--ckpt_path", "last"] if resume else [])])
    times["fit"] = time.monotonic() - start
    best_path = fit.trainer.checkpoint_callback.best_model_path
    ckpt = best_path if best and best_path else str(stage_dir / "checkpoints" / "last.ckpt")
    record.update(checkpoint=ckpt, train_log=str(Path(fit.trainer.log_dir) / "metrics.csv"), steps=_steps(ckpt))
    start = time.monotonic()
    tested = _run(["test", *base, "--ckpt_path", ckpt])
    record["metrics"] = str(Path(tested.trainer.log_dir) / "metrics.json")
    if "predict" in evaluations:
        predicted = _run(["predict", *base, "--ckpt_path", ckpt])
        record["predictions"] = str(Path(predicted.trainer.log_dir) / "predictions.csv")
        record["files"].append(record["predictions"])
    if "incomplete" in evaluations:
        incomplete = _run(["test", *base, "--data.incomplete_instruction", "true", "--ckpt_path", ckpt])
        record["metrics_incomplete"] = str(Path(incomplete.trainer.log_dir) / "metrics.json")
        record["files"].append(record["metrics_incomplete"])
    if "contrast" in evaluations:
        record["contrast"] = str(stage_dir / "contrast.pt")
        save_torch(_contrast(base, ckpt), record["contrast"])
        record["files"].append(record["contrast"])
    times["evaluate"] = time.monotonic() - start
    record["wall_time_s"] = times
    write_text(record_path, json.dumps(record, indent=2) + "\n")
    return record


def _steps(ckpt: str) -> int:
    """The optimizer steps that produced ``ckpt``."""

    return int(load(ckpt, "checkpoint", mmap=True)["global_step"])


def run_probes(seed_dir: Path, config_args: list[str], overrides: dict) -> dict:
    """Linear-probe ceilings of the baseline's data and VLM: frozen image features and pixels (``probes.json``)."""

    out = seed_dir / "probe" / "probes.json"
    if out.is_file():
        print(f"[pipeline] {seed_dir.name}/probe: done earlier, skipped ({out})")
        return json.loads(out.read_text())
    print(f"[pipeline] {seed_dir.name}/probe: linear probes on the VLM's frozen image features and on pixels")
    start = time.monotonic()
    built = _run([*config_args, *cli_args(overrides)], run=False)
    module, datamodule = built.model, built.datamodule
    module.eval()
    splits = {s: datamodule.load(s) for s in ("train", "val", "test")}
    tables = {
        "features": probe_table(
            module.specs, splits, lambda im: vlm_image_features(module.model.vlm, module.collate, im)
        ),
        "pixels": probe_table(module.specs, splits, pixels),
        "wall_time_s": time.monotonic() - start,
    }
    write_text(out, json.dumps(tables, indent=2) + "\n")
    return tables


def run_plug(dataset: str, seed_dir: Path, records: dict, args: dict[str, tuple[list[str], dict]], seed: int) -> dict:
    """VITask^plug on an imported external set (the paper's Table 3): the tuned models tested on its test split,
    none re-tuned: vanilla IT, stage 2 without EP and with EP of the original TSM, and stage 2 with EP of the TSM
    trained on the external set plugged in (``plug_tsm_{dataset}``). Recorded in ``plug_{dataset}/done.json``."""
    out = seed_dir / f"plug_{dataset}"
    record_path = out / "done.json"
    if (record := _valid(record_path)) is not None:
        print(f"[pipeline] {seed_dir.name}/plug_{dataset}: done earlier, skipped ({record_path})")
        return record
    print(f"[pipeline] {seed_dir.name}/plug_{dataset}: tuned models on {dataset}, the original and the plugged TSM")
    start = time.monotonic()
    tests = {  # record key -> (folder, stage, the TSM of w_ep)
        "metrics_vanilla": ("vanilla", "vanilla", None),
        "metrics": ("original", "rda_crt", records["tsm"]["checkpoint"]),
        "metrics_plugged": ("plugged", "rda_crt", records[f"{PLUG_TSM}_{dataset}"]["checkpoint"]),
    }
    record = {"stage": "plug", "dataset": dataset, "seed": seed, "checkpoint": records["rda_crt"]["checkpoint"]}
    for key, (folder, stage, tsm) in tests.items():
        config_args, overrides = args[stage]
        overrides = {**overrides, "data.datasets": [dataset]} | ({"model.init_args.tsm_ckpt": tsm} if tsm else {})
        where = ["--trainer.default_root_dir", str(out / folder), "--ckpt_path", records[stage]["checkpoint"]]
        tested = _run(["test", *config_args, *cli_args(overrides), *where])
        record[key] = str(Path(tested.trainer.log_dir) / "metrics.json")
    record["files"] = [record[k] for k in tests]
    record["wall_time_s"] = {"evaluate": time.monotonic() - start}
    write_text(record_path, json.dumps(record, indent=2) + "\n")
    return record


def _contrast(base: list[str], ckpt: str) -> dict:
    """Fig. 3 data: per-sample mean response-token probability with the own vs a different-label image."""

    built = _run(base, run=False)
    module, datamodule = built.model, built.datamodule
    checkpoint = load(ckpt, "checkpoint")
    check(checkpoint, module, path=ckpt)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    module.eval()
    datamodule.setup("test")
    loader = datamodule.loader("test", module.collate, negatives=True)
    return response_probabilities(module.model, loader)


def pipeline(
    name: str = "demo",
    runs_root: str = "runs",
    configs: str = "configs",
    overlay: str | None = "offline",
    vlm: str | None = None,
    synthesize: dict | None = None,
    common: dict | None = None,
    stages: dict[str, dict] | None = None,
    ablations: bool = False,
    incomplete: bool = False,
    probes: bool = True,
    match_vanilla_steps: bool = False,
    select_on_val: list[str] | None = None,
    plug: list[str] | None = None,
    seeds: int = 1,
    seed: int = 0,
    jobs: int = 1,
) -> Path:
    """Run TSM -> vanilla IT -> stage 1 (EP) -> stage 2 (RDA+CRT) [-> ablations] and write the report.

    Args:
        name: run name; everything goes under ``{runs_root}/{name}``.
        runs_root: folder of runs.
        configs: folder of the stage configs (``tsm.yaml``, ``vanilla.yaml``, ``ep.yaml``, ``rda_crt.yaml``).
        overlay: sub-folder of ``configs`` with the overlays (``offline``: ``tsm.yaml``, and ``vlm.yaml`` for every
            VLM stage), or ``null``.
        vlm: the VLM of every VLM stage and of the probes (``tiny:internvl-generalist``, a directory or a hub id),
            over what the stage configs name; ``null`` keeps theirs.
        synthesize: ``{root, per_class, size}``: write synthetic MedMNIST files there first if missing.
        common: overrides for every stage, dotted keys (``{data.root: data/synthetic, data.datasets: all}``).
        stages: per-stage overrides, ``{tsm: {trainer.max_epochs: 4}, vanilla: {...}, ep: {...}, rda_crt: {...}}``.
        ablations: also run the paper's Table 2 rows: stage 2 with RDA only (beta 0) and CRT only (alpha 0).
        incomplete: also run the paper's incomplete-instruction experiment: vanilla IT and VITask (both stages)
            trained and tested on instructions without the label list.
        probes: measure the linear-probe ceilings (the VLM's frozen image features, and pixels) of every dataset
            on the baseline's data, for the report's validity check.
        match_vanilla_steps: give VITask the optimizer steps of the vanilla IT checkpoint that is tested: stage 1
            half of them, stage 2 (and each ablation) the rest. Train vanilla to a plateau for this to be fair
            (a budget past the plateau of its measured curve, or early stopping in ``stages.vanilla``).
        select_on_val: stages tested at their best validation checkpoint; the others are tested where training
            ended. Default ``[tsm]``. On a small validation split a lucky early epoch can win the selection.
        plug: imported datasets (cards under ``data.root``) that share a tuned dataset's label space, e.g. an
            external diabetic-retinopathy set graded like retinamnist: after stage 2, a TSM is trained on each
            (``plug_tsm_<name>``; its overrides under ``stages.plug_tsm``) and the tuned models are tested on its
            test split w/o EP, w/ EP of the original TSM and w/ EP of the plugged TSM (VITask^plug, Table 3).
        seeds: repeat the whole pipeline with seeds ``seed .. seed + seeds - 1``; the report gives mean ± std.
        seed: first seed.
        jobs: run this many stages at once, each in a worker process with its share of the cores, whenever their
            inputs are ready (seeds, the ablations, the incomplete-instruction rows and the probes are
            independent); their output goes to ``<stage>/log.txt``. 1 runs everything in this process, in order.
    """

    if seeds < 1:
        raise ConfigError(f"--seeds: {seeds}; use 1 or more.")
    run_dir = Path(runs_root) / name
    stages = stages or {}
    for option, names in (("--stages", stages), ("--select_on_val", select_on_val or [])):
        unknown = set(names) - set(RUNS) - {PLUG_TSM}
        if unknown:
            raise ConfigError(f"{option}: unknown stage(s) {sorted(unknown)}; stages are {[*RUNS, PLUG_TSM]}.")
    if synthesize:
        _ensure_synthetic(**synthesize)
    order = (
        ["tsm", "vanilla", "ep", "rda_crt"]
        + (list(ABLATIONS) if ablations else [])
        + (list(INCOMPLETE) if incomplete else [])
    )
    plug = [_plugged(name, common or {}) for name in plug or []]

    def config_args(config: str) -> list[str]:
        args = ["--config", str(Path(configs) / f"{config}.yaml")]
        return args + (["--config", str(Path(configs) / overlay / f"{STAGES[config].overlay}.yaml")] if overlay else [])

    def overrides_of(stage: str, records: dict) -> dict:
        config = RUNS[stage][0]
        overrides = {**(common or {}), **stages.get(config, {}), **stages.get(stage, {}), **ABLATIONS.get(stage, {})}
        if vlm and stage != "tsm":
            overrides["model.init_args.vlm"] = vlm
        if stage in INCOMPLETE:
            overrides["data.incomplete_instruction"] = True
        if "tsm_ckpt" in STAGES[config].needs:  # TSM -> both VITask stages
            overrides["model.init_args.tsm_ckpt"] = records["tsm"]["checkpoint"]
        if stage in INIT_FROM:  # stage 1 -> stage 2
            overrides["model.init_args.init_from"] = records[INIT_FROM[stage]]["checkpoint"]
        if match_vanilla_steps and stage in (*FIRST_HALF, *INIT_FROM):
            total = records[BASELINE[stage]]["steps"]
            overrides["trainer.max_steps"] = max(1, total // 2 if stage in FIRST_HALF else total - total // 2)
            overrides["trainer.max_epochs"] = -1
        return overrides

    def needs(stage: str) -> tuple[str, ...]:  # the runs whose records overrides_of(stage) reads
        reads = _Reads()
        overrides_of(stage, reads)
        return tuple(reads)

    selected = select_on_val if select_on_val is not None else ["tsm"]
    start = time.monotonic()
    if vlm and jobs > 1:  # build a missing tiny model once, here, rather than in every worker at once
        resolve_source(vlm, int((common or {}).get("data.size", 28)), option="--vlm")
    units = {}
    for s in range(seed, seed + seeds):
        seed_dir = run_dir / f"seed{s}"

        def unit(stage, fn, args, deps=(), seed_dir=seed_dir, s=s):
            deps = tuple((s, d) for d in deps)
            label = f"{seed_dir.name}/{stage}"
            units[(s, stage)] = Unit(fn, args, deps, log=seed_dir / stage / "log.txt", label=label)

        def stage_args(stage, seed_dir=seed_dir, s=s):
            return lambda done: (
                stage,
                seed_dir,
                config_args(RUNS[stage][0]),
                overrides_of(stage, _of_seed(done, s)),
                s,
                stage in selected,
            )

        for stage in order:
            unit(stage, run_stage, stage_args(stage), needs(stage))
            if stage == "vanilla" and probes:
                args = config_args("vanilla"), {**overrides_of("vanilla", {}), "seed_everything": s}
                unit("probe", run_probes, lambda done, seed_dir=seed_dir, args=args: (seed_dir, *args))
        for dataset in plug:  # VITask^plug: a TSM trained on the external set, into the tuned stage 2
            plug_tsm = f"{PLUG_TSM}_{dataset}"
            overrides = {**overrides_of("tsm", {}), **stages.get(PLUG_TSM, {}), "data.datasets": [dataset]}
            best = "tsm" in selected or PLUG_TSM in selected
            args = (plug_tsm, seed_dir, config_args("tsm"), overrides, s, best, ())
            unit(plug_tsm, run_stage, lambda done, args=args: args)

            def plug_args(done, dataset=dataset, seed_dir=seed_dir, s=s):
                records = _of_seed(done, s)
                tested = {t: (config_args(t), overrides_of(t, records)) for t in ("vanilla", "rda_crt")}
                return dataset, seed_dir, records, tested, s

            unit(f"plug_{dataset}", run_plug, plug_args, ("tsm", "vanilla", "rda_crt", plug_tsm))
    run_units(units, jobs)
    summary = {
        "name": name,
        "seeds": [seed + k for k in range(seeds)],
        "ablations": ablations,
        "incomplete": incomplete,
        "match_vanilla_steps": match_vanilla_steps,
        "plug": plug,
        "jobs": jobs,
        "wall_time_s": time.monotonic() - start,
        "synthetic": bool(synthesize),
    }
    write_text(run_dir / "pipeline.json", json.dumps(summary, indent=2) + "\n")
    report(str(run_dir))
    return run_dir


class _Reads(dict):
    """A stand-in for a seed's records that notes which runs are read (a stage's dependencies)."""

    def __missing__(self, run: str) -> dict:
        self[run] = {"checkpoint": "", "steps": 0}
        return self[run]


def _of_seed(results: dict, seed: int) -> dict:
    """``{(seed, run): record}`` -> one seed's ``{run: record}``."""
    return {run: record for (s, run), record in results.items() if s == seed}


def _plugged(name: str, common: dict) -> str:
    """An external set for VITask^plug: an imported dataset under ``data.root`` sharing a tuned dataset's labels."""
    from vitask_pl.data.cards import read_card, resolve_datasets

    missing = [k for k in ("data.root", "data.datasets") if k not in common]
    if missing:  # the stage configs may name other ones; the external sets are read where the tuned ones are
        raise ConfigError(
            f"--plug: {name} needs {' and '.join(missing)} in --common, where the tuned datasets and the external "
            f"sets' cards are read; add them (e.g. common: {{data.root: data/medmnist, data.datasets: [retinamnist]}})."
        )
    root = common["data.root"]
    card = read_card(root, str(name).lower(), "--plug")
    tuned = resolve_datasets(common["data.datasets"], root)
    if card["shares"] not in tuned:
        raise ConfigError(
            f"--plug: {name} shares {card['shares'] or 'no MedMNIST label space'}, which is not among the tuned "
            f"datasets {tuned}; import it with --shares one of them, or tune on {card['shares']} too."
        )
    return card["name"]


def _ensure_synthetic(root: str = "data/synthetic", per_class: int = 30, size: int = 28, seed: int = 0) -> None:

    missing = [f for f in FLAGS if not npz_path(root, f, size).is_file()]
    if missing:
        synthesize(root, missing, size=size, per_class=per_class, seed=seed)
