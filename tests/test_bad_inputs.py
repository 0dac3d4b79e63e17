"""A catalogue of bad inputs to `vitask`: data, configs, checkpoints and models, as users type them.

Every case runs the real entry point in this process and must exit with status 2 and print exactly one stderr
line, ``error: --the-option-typed ...``, holding the value received; and it must leave every earlier output (a
previous run's checkpoints and logs, synthetic data, the broken files themselves, the feature cache, the tiny
VLM) byte-for-byte as it was, with no new checkpoint anywhere. Adding a case is one ``case(...)`` row in CASES.
"""

import dataclasses
import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from vitask_pl.cli import main
from vitask_pl.data.importer import import_dataset
from vitask_pl.data.synth import synthesize

from .conftest import SMALL_FLAGS, run, stage_configs

# ---------------------------------------------------------------------------------------------- earlier outputs


@dataclasses.dataclass(frozen=True)
class World:
    """What exists before a bad command runs. ``{name}`` in a case's argv or expected text is the path ``name``;
    ``{out}`` is the case's own fresh output folder (its --trainer.default_root_dir, --out...)."""

    data: Path  # synthetic files: SMALL_FLAGS + bloodmnist at 28 px, dermamnist at 64 px
    bad: Path  # bad/<problem>/dermamnist.npz: one broken file per folder
    run: Path  # a previous stage-1 run: checkpoints, logs, config
    tsm: Path  # a TSM checkpoint (tiny ViT, SMALL_FLAGS, 28 px), which that run used
    stage1: Path  # that run's last.ckpt
    junk: Path  # files that only look like what a command needs
    vlm: Path  # a tiny InternVL saved with save_pretrained
    qwen: Path  # a tiny Qwen2-VL, another family
    cache: Path  # the feature cache, holding that run's features
    out: Path  # where a case may write (outside the snapshot, but checked for checkpoints)

    def fmt(self, text: str) -> str:
        """Placeholders -> paths; other braces (YAML flow maps like ``{dermamnist: -1}``) stay."""
        for field in dataclasses.fields(self):
            text = text.replace(f"{{{field.name}}}", str(getattr(self, field.name)))
        return text

    def snapshot(self) -> dict[str, tuple[int, str]]:
        """``{path: (size, sha256)}`` of every earlier output."""
        out = {}
        for folder in (self.data.parent, self.vlm, self.qwen, self.cache):
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    out[str(path)] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        return out


def _write_import_sources(top: Path) -> None:
    """Sources for `vitask data import`, each with one problem; ``good`` has none."""
    from PIL import Image
    from pydicom.data import get_testdata_file

    def png(path: Path, shape=(8, 8)) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(shape, 128, np.uint8)).save(path)

    for name in ("good", "corrupt", "empty", "nopixel"):
        for label in ("a", "b"):
            for i in range(3):
                png(top / name / label / f"{i}.png")
    (top / "corrupt/b/2.png").write_bytes(b"\x89PNG not really")
    shutil.rmtree(top / "empty/b")
    (top / "empty/b").mkdir()
    shutil.copy(get_testdata_file("rtplan.dcm"), top / "nopixel/b/plan.dcm")
    png(top / "mixed/a/0.png")
    png(top / "mixed/b/0.png", (8, 8, 3))
    (top / "labels.csv").write_text("path,label\ngood/a/0.png,a\ngood/b/0.png,c\n")


def _write_bad_files(good: Path, bad: Path) -> None:
    """One broken ``dermamnist.npz`` per folder, each the good file with one thing wrong."""
    with np.load(good) as npz:
        arrays = dict(npz)

    def write(name: str, **change) -> None:
        (bad / name).mkdir(parents=True)
        np.savez(bad / name / "dermamnist.npz", **{k: v for k, v in {**arrays, **change}.items() if v is not None})

    write("keys", train_images=None, train_imgs=arrays["train_images"])
    write("dtype", train_images=arrays["train_images"].astype(np.float32))
    write("shape", train_images=arrays["train_images"][..., 0])  # gray, but dermamnist is RGB
    write("labels", train_labels=np.full_like(arrays["train_labels"], 7))  # 7 classes: 0..6
    (bad / "truncated").mkdir()
    (bad / "truncated/dermamnist.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])


def _write_junk(junk: Path, tsm_ckpt: Path, vlm: Path) -> None:
    junk.mkdir()
    (junk / "garbage.ckpt").write_bytes(b"not a checkpoint\n" * 64)
    (junk / "truncated.ckpt").write_bytes(tsm_ckpt.read_bytes()[:4096])
    (junk / "predictions.csv").write_text("image,dataset\n")  # an earlier `vitask classify` output
    (junk / "no_processor").mkdir()
    shutil.copy(vlm / "config.json", junk / "no_processor")
    for name, config in (("bert", '{"model_type": "bert"}'), ("bad_json", "{not json")):
        (junk / name).mkdir()
        for file in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
            (junk / name / file).write_text(config if file == "config.json" else "{}")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tsm_ckpt, tiny_dirs, feature_cache_dir) -> World:
    top = tmp_path_factory.mktemp("earlier")
    w = World(
        data=top / "data",
        bad=top / "bad",
        run=top / "run",
        tsm=Path(tsm_ckpt),
        stage1=top / "run/last.ckpt",
        junk=top / "junk",
        vlm=Path(tiny_dirs["internvl"]),
        qwen=Path(tiny_dirs["qwen2_vl"]),
        cache=Path(feature_cache_dir),
        out=top / "unused",
    )
    synthesize(w.data, [*SMALL_FLAGS, "bloodmnist"], size=28, per_class=2)
    synthesize(w.data, ["dermamnist"], size=64, per_class=2)
    _write_bad_files(w.data / "dermamnist.npz", w.bad)
    _write_junk(w.junk, w.tsm, w.vlm)
    _write_import_sources(w.junk / "imports")
    import_dataset(str(w.junk / "imports/good"), "mine", root=str(w.data), modality="test")  # an earlier import
    main(fit("ep", "--trainer.limit_val_batches", "1")(dataclasses.replace(w, out=w.run)))  # the previous run
    return dataclasses.replace(w, stage1=next(w.run.rglob("last.ckpt")))


# ------------------------------------------------------------------------------------------------ argv builders
QUICK = [
    "--data.datasets",
    "[dermamnist]",
    "--data.num_workers",
    "0",
    "--data.max_samples",
    "4",
    "--data.batch_size",
    "4",
    "--trainer.max_epochs",
    "1",
    "--trainer.max_steps",
    "1",
    "--trainer.limit_val_batches",
    "0",
    "--trainer.enable_progress_bar",
    "false",
]
STAGE_ARGS = {
    "tsm": ["--model.init_args.backbone", "resnet18"],
    "vanilla": ["--model.init_args.vlm", "{vlm}"],
    "ep": [
        "--model.init_args.vlm",
        "{vlm}",
        "--model.init_args.tsm_ckpt",
        "{tsm}",
        "--model.init_args.exemplar.cache_dir",
        "{cache}",
    ],
    "rda_crt": [
        "--model.init_args.vlm",
        "{vlm}",
        "--model.init_args.tsm_ckpt",
        "{tsm}",
        "--model.init_args.exemplar.cache_dir",
        "{cache}",
        "--model.init_args.init_from",
        "{stage1}",
    ],
}


def fit(stage: str, *extra: str, command: str = "fit"):
    """``vitask fit`` (or ``command``) of ``stage`` with its offline overlay, on the world's data and model, a few
    samples, into ``{out}``; ``extra`` comes last, so it overrides."""
    argv = [
        command,
        *stage_configs(stage),
        "--data.root",
        "{data}",
        "--trainer.default_root_dir",
        "{out}",
        *QUICK,
        *STAGE_ARGS[stage],
        *extra,
    ]
    return lambda w: [w.fmt(a) for a in argv]


def tool(*argv: str):
    """A tool subcommand as typed: ``tool("data", "synth", "--root", "{data}")``."""
    return lambda w: [w.fmt(a) for a in argv]


def case(id_: str, argv, option: str, *expect: str, xfail: str | None = None):
    """One row: ``argv(world)`` must fail with one line ``error: {option}...`` that holds every ``expect``."""
    marks = [pytest.mark.xfail(reason=xfail, strict=True)] if xfail else []
    return pytest.param(argv, option, expect, id=id_, marks=marks)


# --------------------------------------------------------------------------------------------------- the table
# One case per line: a table reads better than the formatter's five lines a case.
# fmt: off
CASES = [
    # data: the data module's options, the files under --data.root, and the data tools
    case("data-root-missing", fit("tsm", "--data.root", "{out}/nowhere"), "--data.root", "{out}/nowhere/dermamnist.npz not found"),
    case("data-unknown-dataset", fit("tsm", "--data.datasets", "[dermamnst]"), "--data.datasets", "'dermamnst'", "did you mean 'dermamnist'"),
    case("data-empty-datasets", fit("tsm", "--data.datasets", "[]"), "--data.datasets", "empty list"),
    case("data-size", fit("tsm", "--data.size", "32"), "--data.size", "32", "28, 64, 128, 224"),
    case("data-size-not-a-number", fit("tsm", "--data.size", "big"), "--data.size", "'big'"),
    case("data-batch-size-0", fit("tsm", "--data.batch_size", "0"), "--data.batch_size", "--data.batch_size: 0 "),
    case("data-max-samples-0", fit("tsm", "--data.max_samples", "0"), "--data.max_samples", "--data.max_samples: 0 "),
    case("data-weights-unlisted", fit("tsm", "--data.sampling_weights", "{pathmnist: 2}"), "--data.sampling_weights", "'pathmnist'"),
    case("data-weights-negative", fit("tsm", "--data.sampling_weights", "{dermamnist: -1}"), "--data.sampling_weights", "'dermamnist': -1"),
    case("data-npz-truncated", fit("tsm", "--data.root", "{bad}/truncated"), "--data.root", "{bad}/truncated/dermamnist.npz", "truncated"),
    case("data-npz-keys", fit("tsm", "--data.root", "{bad}/keys"), "--data.root", "{bad}/keys/dermamnist.npz", "'train_images'"),
    case("data-npz-dtype", fit("tsm", "--data.root", "{bad}/dtype"), "--data.root", "{bad}/dtype/dermamnist.npz", "float32"),
    case("data-npz-shape", fit("tsm", "--data.root", "{bad}/shape"), "--data.root", "{bad}/shape/dermamnist.npz", "RGB"),
    case("data-labels-out-of-range", fit("tsm", "--data.root", "{bad}/labels"), "--data.root", "{bad}/labels/dermamnist.npz", "[7, 7]", "[0, 6]"),
    case("synth-into-existing", tool("data", "synth", "--root", "{data}", "--datasets", "[dermamnist]"), "--root", "{data}/dermamnist.npz", "--force"),
    case("synth-per-class-1", tool("data", "synth", "--root", "{out}", "--per-class", "1"), "--per-class", "--per-class: 1 "),
    case("synth-unknown-dataset", tool("data", "synth", "--root", "{out}", "--datasets", "[bloodmnst]"), "--datasets", "'bloodmnst'"),
    case("check-bad-labels", tool("data", "check", "--root", "{bad}/labels", "--datasets", "[dermamnist]"), "--root", "{bad}/labels", "1 of 1"),
    case("check-truncated", tool("data", "check", "--root", "{bad}/truncated", "--datasets", "[dermamnist]"), "--root", "{bad}/truncated", "1 of 1"),
    case("check-size", tool("data", "check", "--root", "{data}", "--size", "30"), "--size", "size 30;"),
    # configs: model options of every stage, and the pipeline's
    case("vlm-unknown-tiny-family", fit("vanilla", "--model.init_args.vlm", "tiny:lava"), "--model.init_args.vlm", "'lava'", "did you mean 'llava'"),
    case("vlm-hub-id-offline", fit("vanilla", "--model.init_args.vlm", "nobody/no-such-vlm"), "--model.init_args.vlm", "nobody/no-such-vlm", "HF_HUB_OFFLINE"),
    case("vlm-dtype", fit("vanilla", "--model.init_args.vlm_options.dtype", "float8"), "--model.init_args.vlm_options.dtype", "'float8'", "bfloat16"),
    case("lora-r-0", fit("vanilla", "--model.init_args.lora.r", "0"), "--model.init_args.lora.r", "--model.init_args.lora.r: 0 "),
    case("lora-targets-match-nothing", fit("vanilla", "--model.init_args.lora.targets", "[qkv]"), "--model.init_args.lora.targets", "'qkv'", "q_proj"),
    case("lora-regex-outside-llm", fit("vanilla", "--model.init_args.lora.target_regex", ".*"), "--model.init_args.lora.target_regex", "'.*'", "vision"),
    case("protocol-unknown", fit("vanilla", "--model.init_args.evaluation.val_protocols", "[scor]"), "--model.init_args.evaluation.val_protocols", "'scor'", "'score'"),
    case("prefix-sharing-with-checkpointing", fit("rda_crt", "--model.init_args.vlm_options.prefix_sharing", "true", "--model.init_args.vlm_options.gradient_checkpointing", "true"), "--model.init_args.vlm_options.prefix_sharing", "gradient checkpointing", "prefix_sharing: false"),
    case("max-length-too-small", fit("vanilla", "--model.init_args.vlm_options.max_length", "8"), "--model.init_args.vlm_options.max_length", "--model.init_args.vlm_options.max_length: 8 "),
    case("feature-kind", fit("ep", "--model.init_args.exemplar.feature_kind", "cls"), "--model.init_args.exemplar.feature_kind", "'cls'", "'pooled'"),
    case("exemplar-tokens-0", fit("ep", "--model.init_args.exemplar.tokens", "0"), "--model.init_args.exemplar.tokens", "--model.init_args.exemplar.tokens: 0;"),
    case("rda-direction", fit("ep", "--model.init_args.objective.rda_direction", "sideways"), "--model.init_args.objective.rda_direction", "'sideways'"),
    case("rda-temperature-0", fit("ep", "--model.init_args.objective.rda_temperature", "0"), "--model.init_args.objective.rda_temperature", "--model.init_args.objective.rda_temperature: 0"),
    case("alpha-negative-stage1", fit("ep", "--model.init_args.objective.alpha", "-1"), "--model.init_args.objective.alpha", "--model.init_args.objective.alpha: -1"),
    case("alpha-negative-stage2", fit("rda_crt", "--model.init_args.objective.alpha", "-1"), "--model.init_args.objective.alpha", "--model.init_args.objective.alpha: -1"),
    case("beta-negative", fit("rda_crt", "--model.init_args.objective.beta", "-0.5"), "--model.init_args.objective.beta", "--model.init_args.objective.beta: -0.5"),
    case("stage1-without-tsm-ckpt", fit("ep", "--model.init_args.tsm_ckpt", "null"), "--model.init_args.tsm_ckpt", "required", "configs/tsm.yaml"),
    case("stage2-without-init-from", fit("rda_crt", "--model.init_args.init_from", "null"), "--model.init_args.init_from", "required", "configs/ep.yaml"),
    case("tsm-backbone-unknown", fit("tsm", "--model.init_args.backbone", "resnet181"), "--model.init_args.backbone", "'resnet181'", "did you mean"),
    case("pipeline-unknown-stage", tool("pipeline", "--runs_root", "{out}", "--stages", "{tsmm: {}}"), "--stages", "'tsmm'", "'rda_crt'"),
    case("pipeline-seeds-0", tool("pipeline", "--runs_root", "{out}", "--seeds", "0"), "--seeds", "--seeds: 0;"),
    # checkpoints: the TSM and stage-1 checkpoints a stage reads, --ckpt_path, feature export, report
    case("tsm-ckpt-missing", fit("ep", "--model.init_args.tsm_ckpt", "{out}/nope.ckpt"), "--model.init_args.tsm_ckpt", "{out}/nope.ckpt", "not found"),
    case("tsm-ckpt-other-datasets", fit("ep", "--data.datasets", "[bloodmnist]"), "--model.init_args.tsm_ckpt", "{tsm}", "'bloodmnist'"),
    case("tsm-ckpt-other-size", fit("ep", "--data.size", "64"), "--model.init_args.tsm_ckpt", "{tsm}", "28 px", "--data.size is 64"),
    case("tsm-ckpt-is-stage1", fit("ep", "--model.init_args.tsm_ckpt", "{stage1}"), "--model.init_args.tsm_ckpt", "{stage1}", "stage 1"),
    case("tsm-ckpt-garbage", fit("ep", "--model.init_args.tsm_ckpt", "{junk}/garbage.ckpt"), "--model.init_args.tsm_ckpt", "{junk}/garbage.ckpt"),
    case("tsm-ckpt-truncated", fit("ep", "--model.init_args.tsm_ckpt", "{junk}/truncated.ckpt"), "--model.init_args.tsm_ckpt", "{junk}/truncated.ckpt"),
    case("init-from-missing", fit("rda_crt", "--model.init_args.init_from", "{out}/nope.ckpt"), "--model.init_args.init_from", "{out}/nope.ckpt", "not found"),
    case("init-from-is-tsm", fit("rda_crt", "--model.init_args.init_from", "{tsm}"), "--model.init_args.init_from", "{tsm}", "TSM stage"),
    case("init-from-truncated", fit("rda_crt", "--model.init_args.init_from", "{junk}/truncated.ckpt"), "--model.init_args.init_from", "{junk}/truncated.ckpt"),
    case("ckpt-path-missing", fit("ep", "--ckpt_path", "{out}/nope.ckpt", command="test"), "--ckpt_path", "{out}/nope.ckpt"),
    case("ckpt-path-garbage", fit("ep", "--ckpt_path", "{junk}/garbage.ckpt", command="test"), "--ckpt_path", "{junk}/garbage.ckpt"),
    case("import-corrupt-image", tool("data", "import", "--source", "{junk}/imports/corrupt", "--name", "x", "--root", "{out}", "--modality", "m"), "--source", "{junk}/imports/corrupt/b/2.png", "not a readable image"),
    case("import-dicom-no-pixels", tool("data", "import", "--source", "{junk}/imports/nopixel", "--name", "x", "--root", "{out}", "--modality", "m"), "--source", "plan.dcm", "without pixel data"),
    case("import-mixed-channels", tool("data", "import", "--source", "{junk}/imports/mixed", "--name", "x", "--root", "{out}", "--modality", "m"), "--source", "1 gray and 1 RGB", "--channels"),
    case("import-empty-class", tool("data", "import", "--source", "{junk}/imports/empty", "--name", "x", "--root", "{out}", "--modality", "m"), "--source", "{junk}/imports/empty/b holds no image"),
    case("import-label-outside", tool("data", "import", "--source", "{junk}/imports/labels.csv", "--name", "x", "--root", "{out}", "--modality", "m", "--labels", "[a,b]"), "--source", "label 'c'", "--labels"),
    case("import-name-is-a-flag", tool("data", "import", "--source", "{junk}/imports/good", "--name", "dermamnist", "--root", "{out}", "--modality", "m"), "--name", "'dermamnist' is a MedMNIST flag"),
    case("import-shares-other-count", tool("data", "import", "--source", "{junk}/imports/good", "--name", "x", "--root", "{out}", "--shares", "dermamnist"), "--shares", "has 2 classes but dermamnist has 7"),
    case("import-over-existing", tool("data", "import", "--source", "{junk}/imports/good", "--name", "mine", "--root", "{data}", "--modality", "test"), "--name", "{data}/mine.npz already exists", "--force"),
    case("data-unknown-import", fit("tsm", "--data.datasets", "[minee]"), "--data.datasets", "'minee'", "vitask data import"),
    case("features-ckpt-missing", tool("features", "--ckpt", "{out}/nope.ckpt", "--out", "{out}/f.pt", "--root", "{data}"), "--ckpt", "{out}/nope.ckpt"),
    case("features-out-exists", tool("features", "--ckpt", "{tsm}", "--out", "{stage1}", "--root", "{data}"), "--out", "{stage1}", "already exists"),
    case("features-root-missing", tool("features", "--ckpt", "{tsm}", "--out", "{out}/f.pt", "--root", "{out}/nowhere"), "--root", "{out}/nowhere/dermamnist.npz"),
    case("features-kind", tool("features", "--ckpt", "{tsm}", "--out", "{out}/f.pt", "--root", "{data}", "--kind", "cls"), "--kind", "'cls'", "pooled"),
    case("features-split", tool("features", "--ckpt", "{tsm}", "--out", "{out}/f.pt", "--root", "{data}", "--split", "testing"), "--split", "'testing'"),
    case("report-not-a-run", tool("report", "{data}"), "RUN_DIR", "{data}", "vitask pipeline"),
    # classify: image files through a stage checkpoint
    case("classify-corrupt-image", tool("classify", "--model", "{stage1}", "--images", "[{junk}/imports/corrupt]", "--convert", "true", "--out", "{out}/p.csv"), "--images", "{junk}/imports/corrupt/b/2.png", "not a readable image"),
    case("classify-dicom-no-pixels", tool("classify", "--model", "{stage1}", "--images", "[{junk}/imports/nopixel/b/plan.dcm]", "--out", "{out}/p.csv"), "--images", "plan.dcm", "without pixel data"),
    case("classify-gray-into-rgb", tool("classify", "--model", "{stage1}", "--images", "[{junk}/imports/good]", "--out", "{out}/p.csv"), "--images", "gray but the dataset is RGB", "--convert true"),
    case("classify-empty-folder", tool("classify", "--model", "{stage1}", "--images", "[{junk}/imports/empty/b]", "--out", "{out}/p.csv"), "--images", "holds no PNG"),
    case("classify-untrained-dataset", tool("classify", "--model", "{stage1}", "--dataset", "bloodmnist", "--images", "[{junk}/imports/good]", "--out", "{out}/p.csv"), "--dataset", "'bloodmnist' is not among the stage's tuned datasets ['dermamnist']"),
    case("classify-unknown-dataset", tool("classify", "--model", "{stage1}", "--dataset", "nothere", "--images", "[{junk}/imports/good]", "--root", "{data}", "--out", "{out}/p.csv"), "--dataset", "'nothere'", "vitask data import"),
    case("classify-model-is-tsm", tool("classify", "--model", "{tsm}", "--images", "[{junk}/imports/good]", "--out", "{out}/p.csv"), "--model", "{tsm}", "TSM-stage checkpoint"),
    case("classify-model-folder", tool("classify", "--model", "{data}", "--images", "[{junk}/imports/good]", "--out", "{out}/p.csv"), "--model", "{data}", "vitask_export.json"),
    case("classify-tsm-missing", tool("classify", "--model", "{stage1}", "--tsm_ckpt", "{out}/nope.ckpt", "--images", "[{junk}/imports/good]", "--out", "{out}/p.csv"), "--tsm_ckpt", "{out}/nope.ckpt", "--ep false"),
    case("classify-out-exists", tool("classify", "--model", "{stage1}", "--images", "[{junk}/imports/good]", "--out", "{junk}/predictions.csv"), "--out", "{junk}/predictions.csv", "--force"),
    case("classify-out-suffix", tool("classify", "--model", "{stage1}", "--images", "[{junk}/imports/good]", "--out", "{out}/p.txt"), "--out", "{out}/p.txt", ".csv"),
    case("pipeline-plug-unknown", tool("pipeline", "--runs_root", "{out}", "--common", "{data.root: {data}, data.datasets: [dermamnist]}", "--plug", "[nothere]"), "--plug", "'nothere'", "vitask data import"),
    case("pipeline-plug-without-root", tool("pipeline", "--runs_root", "{out}", "--plug", "[mine]"), "--plug", "mine needs data.root and data.datasets in --common"),
    case("classify-no-such-device", tool("classify", "--model", "{stage1}", "--images", "[{junk}/imports/good]", "--device", "cuda:7", "--out", "{out}/p.csv"), "--device", "cuda:7", "--device cpu"),
    case("pipeline-plug-not-shared", tool("pipeline", "--runs_root", "{out}", "--common", "{data.root: {data}, data.datasets: [dermamnist]}", "--plug", "[mine]"), "--plug", "mine shares no MedMNIST label space", "--shares"),
    # checkpoints of another configuration, and outputs that must not be overwritten
    case("ckpt-path-other-stage", fit("vanilla", "--ckpt_path", "{stage1}", command="test"), "--ckpt_path", "{stage1}", "differs in stage", "stage 1 (EP)", "vanilla IT"),
    case("ckpt-path-other-datasets", fit("ep", "--data.datasets", "[pneumoniamnist]", "--ckpt_path", "{stage1}", command="test"), "--ckpt_path", "differs in datasets", "datasets ['pneumoniamnist']"),
    case("init-from-other-lora-rank", fit("rda_crt", "--model.init_args.lora.r", "4"), "--model.init_args.init_from", "{stage1}", "differs in lora_r", "lora_r 8", "lora_r 4"),
    case("init-from-other-family", fit("rda_crt", "--model.init_args.vlm", "{qwen}"), "--model.init_args.init_from", "{stage1}", "differs in family", "family internvl", "family qwen2_vl"),
    case("resume-without-last-ckpt", fit("tsm", "--ckpt_path", "last"), "--ckpt_path", "--ckpt_path last: {out}/checkpoints holds no last.ckpt"),
    case("fit-over-earlier-run", fit("ep", "--trainer.default_root_dir", "{run}"), "--trainer.default_root_dir", "{run}", "--ckpt_path last"),
    case("output-dir-unwritable", fit("tsm", "--trainer.default_root_dir", "{data}/dermamnist.npz/run"), "--trainer.default_root_dir", "{data}/dermamnist.npz/run", "cannot write"),
    # models: tiny builds and local VLM directories
    case("tiny-vlm-unknown-family", tool("tiny-vlm", "--family", "lava", "--out", "{out}"), "--family", "'lava'", "did you mean 'llava'"),
    case("tiny-vlm-image-size", tool("tiny-vlm", "--family", "llava", "--out", "{out}", "--image-size", "30"), "--image-size", "--image-size: 30 "),
    case("tiny-vlm-out-exists", tool("tiny-vlm", "--family", "llava", "--out", "{run}"), "--out", "{run}", "--force"),
    case("vlm-dir-not-a-model", fit("vanilla", "--model.init_args.vlm", "{data}"), "--model.init_args.vlm", "{data}", "config.json"),
    case("vlm-dir-no-processor", fit("vanilla", "--model.init_args.vlm", "{junk}/no_processor"), "--model.init_args.vlm", "{junk}/no_processor", "processor_config.json"),
    case("vlm-dir-unsupported-type", fit("vanilla", "--model.init_args.vlm", "{junk}/bert"), "--model.init_args.vlm", "'bert'", "internvl"),
    case("vlm-dir-bad-config-json", fit("vanilla", "--model.init_args.vlm", "{junk}/bad_json"), "--model.init_args.vlm", "{junk}/bad_json", "config.json"),
]
# fmt: on


@pytest.mark.parametrize(("argv", "option", "expect"), CASES)
def test_bad_input_is_one_line_naming_option_and_value_and_changes_nothing(
    argv, option, expect, world, tmp_path, capsys
):
    world = dataclasses.replace(world, out=tmp_path / "out")
    before = world.snapshot()
    code, _, err = run(argv(world), capsys)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and re.match(rf"error: {re.escape(option)}[: ]", lines[0]), err
    for text in map(world.fmt, expect):
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    after = world.snapshot()
    assert not [p for p, entry in before.items() if after.get(p) != entry], "earlier outputs changed or disappeared"
    new_checkpoints = [
        str(p) for p in [*map(Path, set(after) - set(before)), *tmp_path.rglob("*")] if p.suffix == ".ckpt"
    ]
    assert not new_checkpoints, f"a failed command wrote checkpoints: {new_checkpoints}"
