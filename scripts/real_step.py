"""One `vitask fit` step of stage 2 on the `real`-shaped random model: InternVL3-2B's sizes, 448 px, a
151,674-token vocabulary (vitask_pl/models/shapes.py). The first run of this project at a real model's shapes.

    python scripts/real_step.py [--workdir DIR] [--dtype float32|bfloat16]

It builds the model (random weights, no download), trains a TSM for one step, runs one stage-1 step (stage 2's
init_from) and one stage-2 step, each as its own `vitask fit` process, through the shipped configs and the
offline overlay. Per process it prints the wall time and the peak RSS, and for stage 2 the training step's own
time (the progress line at the end of fit). Not part of `make test`: it writes about 9 GB and takes minutes on a
CPU. On a GPU add `--accelerator gpu`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAGS = "[dermamnist,pneumoniamnist]"


def run(label: str, argv: list[str]) -> str:
    """Run ``argv`` as a child process; print its wall time and its own peak RSS (wait4); return its output."""
    with tempfile.TemporaryFile(mode="w+") as log:
        start = time.monotonic()
        child = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.monotonic() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read()
    peak = usage.ru_maxrss * 1024  # kilobytes on Linux
    print(f"{label:<40} wall {wall:7.1f} s   peak RSS {peak / 2**30:6.2f} GiB", flush=True)
    if child.returncode:
        print(out[-4000:], file=sys.stderr)
        raise SystemExit(child.returncode)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where the model, data and runs go (default: a temp dir)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitask-real-"))
    vitask = [sys.executable, "-m", "vitask_pl.cli"]
    env_note = f"threads {os.environ.get('OMP_NUM_THREADS', 'default')}, dtype {args.dtype}, {args.accelerator}"
    print(f"real-shaped stage-2 step under {work} ({env_note})", flush=True)

    model = work / "internvl3-2b-shaped"
    if not (model / "config.json").is_file():
        code = f"from vitask_pl.models.shapes import build_shaped; build_shaped('real', {str(model)!r})"
        run("build the real-shaped model", [sys.executable, "-c", code])
    if not (work / "data").is_dir():
        synth = [*vitask, "data", "synth", "--root", str(work / "data"), "--size", "224", "--datasets", FLAGS]
        run("synthetic data (224 px)", synth)
    common = [
        "--data.root",
        str(work / "data"),
        "--data.size",
        "224",
        "--data.datasets",
        FLAGS,
        "--data.batch_size",
        "1",
        "--data.num_workers",
        "0",
        "--data.max_samples",
        "16",  # a few of each split; CRT needs two labels among the training samples
        "--trainer.max_steps",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.accelerator",
        args.accelerator,
        "--trainer.enable_progress_bar",
        "true",
    ]
    tsm = work / "tsm"
    run(
        "TSM (resnet18), 1 step",
        [
            *vitask,
            "fit",
            "--config",
            "configs/tsm.yaml",
            "--config",
            "configs/offline/tsm.yaml",
            *common,
            "--model.init_args.backbone",
            "resnet18",
            "--trainer.default_root_dir",
            str(tsm),
        ],
    )
    vlm = [
        "--config",
        "configs/offline/vlm.yaml",
        "--model.init_args.vlm",
        str(model),
        "--model.init_args.vlm_options.dtype",
        args.dtype,
        "--model.init_args.tsm_ckpt",
        str(tsm / "checkpoints" / "last.ckpt"),
        "--model.init_args.exemplar.cache_dir",
        str(work / "features"),
    ]
    run(
        "stage 1, 1 step (stage 2's init_from)",
        [*vitask, "fit", "--config", "configs/ep.yaml", *vlm, *common, "--trainer.default_root_dir", str(work / "ep")],
    )
    out = run(
        "stage 2 (RDA+CRT), 1 step",
        [
            *vitask,
            "fit",
            "--config",
            "configs/rda_crt.yaml",
            *vlm,
            *common,
            "--model.init_args.init_from",
            str(work / "ep" / "checkpoints" / "last.ckpt"),
            "--trainer.default_root_dir",
            str(work / "rda_crt"),
        ],
    )
    done = [line for line in out.splitlines() if line.rstrip().endswith(", done")]
    step = re.search(r"(\d+(?:\.\d+)?) (s|min), done", done[-1]) if done else None
    if step:
        seconds = float(step[1]) * (60 if step[2] == "min" else 1)
        print(f"stage-2 training step (fit's own clock, first step included): {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
