import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub name must fail at once, never retry for minutes
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning  # noqa: E402, F401  (imported at collection: its log handler must bind the real stderr, not a test's capture)
import pytest  # noqa: E402
import torch  # noqa: E402

SMALL_FLAGS = ["dermamnist", "chestmnist", "pneumoniamnist", "organamnist"]  # RGB, multi-label, binary, gray
ROOT = Path(__file__).resolve().parents[1]  # the repository: configs/, Makefile
TINY_TSM = [  # a TSM fit that takes seconds: a small backbone, one epoch of 16 samples, no workers, no progress bar
    "--model.init_args.backbone",
    "resnet18",
    "--trainer.max_epochs",
    "1",
    "--data.num_workers",
    "0",
    "--trainer.enable_progress_bar",
    "false",
    "--data.max_samples",
    "16",
]


def stage_configs(stage: str) -> list[str]:
    """``--config`` of a stage's paper-setting file and of its offline overlay, as the README has them."""
    from vitask_pl.stages import STAGES

    overlay = STAGES[stage].overlay
    return ["--config", str(ROOT / f"configs/{stage}.yaml"), "--config", str(ROOT / f"configs/offline/{overlay}.yaml")]


def tsm_fit(root, out, *extra: str, command: str = "fit", datasets: str = "[dermamnist]") -> list[str]:
    """``vitask <command>`` of the TSM stage with its offline overlay on ``root``'s data into ``out``, a few seconds
    long (:data:`TINY_TSM`); ``extra`` comes last, so it overrides."""
    where = ["--data.root", str(root), "--data.datasets", datasets, "--trainer.default_root_dir", str(out)]
    return [command, *stage_configs("tsm"), *where, *TINY_TSM, *extra]


def run(argv, capsys):
    """(exit code, stdout, stderr) of `vitask argv` run in this process."""
    from vitask_pl.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matrices: with several threads on a busy 2-core machine, OpenMP spinning costs 100x the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Freshly built random-weight tiny VLMs of every family (not the warmed `tiny:` cache)."""
    from vitask_pl.models.families import FAMILY_NAMES
    from vitask_pl.models.tiny import build_tiny_vlm

    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_vlm(f, str(root / f)) for f in FAMILY_NAMES}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """Synthetic MedMNIST files at 28 px for four datasets covering every task type and both channel counts."""
    from vitask_pl.data.synth import synthesize

    root = tmp_path_factory.mktemp("medmnist")
    synthesize(root, SMALL_FLAGS, size=28, per_class=8, seed=0)
    return root


@pytest.fixture(scope="session")
def digits_tree(tmp_path_factory):
    """scikit-learn's bundled digit images (0-16 gray levels) as a PNG class-folder tree, 20 per class."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits") / "tree"
    data = load_digits()
    seen: dict[int, int] = {}
    for i, (image, label) in enumerate(zip(data.images, data.target)):
        if seen.get(label, 0) == 20:
            continue
        seen[label] = seen.get(label, 0) + 1
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(root / str(label) / f"{i:04d}.png")
    return root


def quick_trainer(max_steps: int, **overrides):
    """A CPU Trainer for a few steps that writes and prints nothing: no logger, checkpoints, bar, summary or
    validation unless ``overrides`` ask for them."""
    import lightning as L

    settings = dict(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**settings, **overrides})


def make_tsm_ckpt(root, flags, path, *, embed_dim=32, seed=0):
    """A TSM-stage checkpoint after two training steps (tiny ViT), as `vitask fit --config configs/tsm.yaml` writes."""
    import lightning as L

    from vitask_pl.data.datamodule import MedMNISTDataModule
    from vitask_pl.modules.tsm import TSMModule

    L.seed_everything(seed)
    dm = MedMNISTDataModule(root, flags, 28, batch_size=8, num_workers=0)
    model = TSMModule(
        "vit_tiny_patch16_224",
        datasets=dm.flags,
        image_size=28,
        backbone_kwargs={"patch_size": 7, "depth": 1, "embed_dim": embed_dim, "num_heads": 2},
    )
    trainer = quick_trainer(2)
    trainer.fit(model, dm)
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="session")
def tsm_ckpt(synth_root, tmp_path_factory):
    return make_tsm_ckpt(synth_root, SMALL_FLAGS, tmp_path_factory.mktemp("tsm") / "tsm.ckpt")


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("features"))


def sharpen(model: torch.nn.Module, seed: int = 0) -> None:
    """Redraw every matrix (LoRA's too) at a large scale, so outputs depend strongly on every input position.

    At the default init a 64-wide model predicts an almost uniform distribution, where a wrong position, a
    shifted label or a stale cache entry would change a value by less than any tolerance.
    """
    import math

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                gain = 3.0 if ("embed" in name or "lm_head" in name) else 1.5
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[-1]))
