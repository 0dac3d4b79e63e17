"""The `vitask` command as users type it. In-process where possible: each new process pays ~8 s of imports."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vitask_pl.cli import build_cli
from vitask_pl.stages import STAGES

from .conftest import ROOT, SMALL_FLAGS, TINY_TSM, run, stage_configs, tsm_fit

STAGE_FILES = sorted((ROOT / "configs").glob("*.yaml"))  # one per stage; base/ holds what they include
# Every stage file alone, and each with its offline overlay (offline/vlm.yaml serves all three VLM stages).
CONFIGS = [(p, None) for p in STAGE_FILES] + [
    (p, ROOT / "configs/offline" / f"{STAGES[p.stem].overlay}.yaml") for p in STAGE_FILES
]


def test_help_lists_every_subcommand(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("fit", "validate", "test", "predict", "data synth", "data check", "features"):
        assert command in out


def test_every_overlay_and_base_file_is_used():
    import yaml

    included = {  # a group given as a file name (`data: base/vlm_data.yaml`) is read from beside the stage file
        p.parent / v for p in STAGE_FILES for v in yaml.safe_load(p.read_text()).values() if str(v).endswith(".yaml")
    }
    used = {overlay for _, overlay in CONFIGS} | included
    assert (
        included
        and set((ROOT / "configs/offline").glob("*.yaml")) | set((ROOT / "configs/base").glob("*.yaml")) <= used
    )


@pytest.mark.parametrize(
    "config, overlay", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")) if p is not None else "alone"
)
def test_every_shipped_config_parses(config, overlay, capsys, synth_root):
    argv = ["fit", "--config", str(config)]
    if overlay is not None:
        argv += ["--config", str(overlay), "--data.root", str(synth_root), "--data.datasets", "[dermamnist]"]
    else:  # real configs point at data that is not here; only parsing is checked
        argv += ["--data.download", "true"]
    code, out, err = run([*argv, "--print_config"], capsys)
    assert code == 0, err
    assert "class_path" in out


def _make_pipeline_commands() -> dict[str, list[str]]:
    """The `vitask pipeline ...` line of each Makefile target that has one, as argv."""
    commands, target = {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line and not line[0].isspace() and ":" in line:
            target = line.split(":")[0]
        elif "vitask pipeline" in line:
            commands[target] = line.split("vitask pipeline", 1)[1].split()
    return commands


@pytest.mark.parametrize("target", ["demo", "method"])
def test_make_pipeline_commands_parse(target, capsys):
    """`make demo` (the benchmark's config plus the demo overlay) and `make method`, exactly as the Makefile has them."""
    argv = [a.replace("configs/", str(ROOT / "configs") + "/") for a in _make_pipeline_commands()[target]]
    code, out, err = run(["pipeline", *argv, "--print_config"], capsys)
    assert code == 0, err
    assert "rda_crt:" in out and "vlm: tiny:internvl-generalist" in out
    assert f"name: {target}" in out
    assert ("ablations: false" in out) == (target == "demo")


def test_links_fill_model_from_data(synth_root):
    cli = build_cli(
        [
            *stage_configs("tsm"),
            "--data.root",
            str(synth_root),
            "--data.datasets",
            "[dermamnist,chestmnist]",
        ],
        run=False,
    )
    assert [s.flag for s in cli.model.specs] == ["dermamnist", "chestmnist"]
    assert cli.model.hparams.image_size == cli.datamodule.size == 28
    assert cli.model.head.out_features == 7 + 14


BAD_INPUTS = [
    (["--data.datasets", "[dermamnst]"], "--data.datasets: unknown dataset 'dermamnst'"),
    (["--data.size", "32"], "--data.size: unsupported image size 32"),
    (["--data.root", "{tmp}/nowhere"], "dermamnist.npz not found"),
    (["--data.root", "{tmp}/nowhere", "--data.download", "true"], "--data.download true: cannot reach"),
    (["--model.init_args.backbone", "resnet181"], "timm has no model 'resnet181'"),
    (["--model.init_args.backbone", "resnet18.a1_in1k", "--model.init_args.pretrained", "true"], "pretrained"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS, ids=[m.split(":")[0][:30] for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(extra, message, capsys, synth_root, tmp_path):
    out_dir = tmp_path / "run"
    argv = tsm_fit(synth_root, out_dir, *(e.format(tmp=tmp_path) for e in extra))
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err
    assert not out_dir.exists()


def test_data_tools_bad_input(capsys, tmp_path):
    code, _, err = run(["data", "synth", "--root", str(tmp_path), "--datasets", "[nope]"], capsys)
    assert code == 2 and "--datasets: unknown dataset 'nope'" in err
    code, _, err = run(["data", "check", "--root", str(tmp_path), "--datasets", "[dermamnist]"], capsys)
    assert code == 2 and "1 of 1 files failed" in err


def write_like_other_code(root: Path):
    """MedMNIST-format files at 64 px written without vitask: gray+binary, RGB+multi-class, gray+multi-label."""
    rng = np.random.default_rng(0)
    spec = {"pneumoniamnist": (None, 2), "bloodmnist": (3, 8), "chestmnist": (None, 14)}
    for flag, (channels, classes) in spec.items():
        arrays = {}
        for split, n in (("train", 48), ("val", 16), ("test", 16)):
            shape = (n, 64, 64) if channels is None else (n, 64, 64, channels)
            if flag == "chestmnist":
                labels = (rng.random((n, 14)) < 0.2).astype(np.uint8)
            else:
                labels = (np.arange(n) % classes)[:, None].astype(np.uint8)
            signal = labels.astype(np.float32).mean(1)[:, None, None] * 100
            images = np.clip(rng.normal(100, 20, size=shape) + signal.reshape((n,) + (1,) * (len(shape) - 1)), 0, 255)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images.astype(np.uint8), labels
        np.savez_compressed(root / f"{flag}_64.npz", **arrays)
    return list(spec)


@pytest.mark.slow
def test_foreign_64px_files_check_train_and_test(capsys, tmp_path):
    flags = write_like_other_code(tmp_path)
    code, out, err = run(
        ["data", "check", "--root", str(tmp_path), "--datasets", f"[{','.join(flags)}]", "--size", "64"], capsys
    )
    assert code == 0, err
    assert out.count("custom (MD5 n/a)") == 3 and "all 3 files" in out
    common = [
        *stage_configs("tsm"),
        "--data.root",
        str(tmp_path),
        "--data.datasets",
        f"[{','.join(flags)}]",
        "--data.size",
        "64",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        *TINY_TSM,
    ]
    code, _, err = run(["fit", *common], capsys)
    assert code == 0, err
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    code, out, err = run(["test", *common, "--ckpt_path", str(ckpt)], capsys)
    assert code == 0, err
    metrics = json.loads(next((tmp_path / "run").rglob("metrics.json")).read_text())
    assert set(metrics) == {*flags, "avg"} and all({"acc", "f1", "auc"} <= set(m) for m in metrics.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone",
    [["resnet18"], ["vit_tiny_patch16_224", "--model.init_args.backbone_kwargs", "{patch_size: 7, depth: 1}"]],
)
def test_backbone_swapped_on_the_command_line(backbone, capsys, synth_root, tmp_path):
    code, _, err = run(
        tsm_fit(synth_root, tmp_path, "--model.init_args.backbone", *backbone, datasets=f"[{','.join(SMALL_FLAGS)}]"),
        capsys,
    )
    assert code == 0, err
    assert list(tmp_path.rglob("best-*.ckpt"))


@pytest.mark.slow
def test_console_script_runs_as_a_process(tmp_path):
    script = Path(sys.executable).with_name("vitask")
    done = subprocess.run(
        [str(script), "data", "synth", "--root", str(tmp_path), "--datasets", "[breastmnist]", "--per-class", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "synthetic" in done.stdout.lower() and (tmp_path / "breastmnist.npz").is_file()


@pytest.mark.parametrize("command", ["test", "predict"])
def test_evaluating_without_a_checkpoint_says_so(command, capsys, synth_root, tmp_path):
    with pytest.warns(UserWarning, match="no --ckpt_path: evaluating the model as the config builds it"):
        code, _, err = run(
            tsm_fit(synth_root, tmp_path, command=command),
            capsys,
        )
    assert code == 0, err
