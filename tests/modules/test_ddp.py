"""Stage 2 under DDP: two gloo processes on CPU train to the same weights from different halves of the data."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.modules.vitask import ExemplarPromptTuning

from ..conftest import quick_trainer
from .ddp_stage2 import FLAGS

SCRIPT = Path(__file__).with_name("ddp_stage2.py")


@pytest.fixture(scope="module")
def stage1_ckpt(tsm_ckpt, feature_cache_dir, synth_root, tmp_path_factory):
    """A stage-1 checkpoint after two training steps (as tests/modules/test_vitask.py makes one)."""
    out = tmp_path_factory.mktemp("stage1")
    module = ExemplarPromptTuning(
        tsm_ckpt=tsm_ckpt, vlm="tiny:internvl", datasets=FLAGS, exemplar={"cache_dir": feature_cache_dir}
    )
    dm = MedMNISTDataModule(synth_root, FLAGS, 28, batch_size=4, num_workers=0, max_samples=8)
    trainer = quick_trainer(2, default_root_dir=out)
    trainer.fit(module, dm)
    trainer.save_checkpoint(out / "stage1.ckpt")
    return str(out / "stage1.ckpt")


@pytest.mark.slow
def test_stage2_ddp_ranks_agree(stage1_ckpt, tsm_ckpt, synth_root, tmp_path):
    cache, out = tmp_path / "features", tmp_path / "out"  # a fresh feature cache: rank 0 builds it, rank 1 waits
    out.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        "--root",
        str(synth_root),
        "--tsm",
        tsm_ckpt,
        "--init",
        stage1_ckpt,
        "--cache",
        str(cache),
        "--out",
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    assert all(r["world_size"] == 2 for r in ranks)
    samples = [set(r["samples"]) for r in ranks]
    assert len(samples[0]) == len(samples[1]) == 16 and not samples[0] & samples[1]  # each rank had its own half
    assert len(ranks[0]["losses"]) == len(ranks[1]["losses"]) == 4
    assert all(math.isfinite(x) for r in ranks for x in r["losses"])
    assert ranks[0]["losses"] != ranks[1]["losses"]  # different data, different losses ...
    trainable = ranks[0]["trainable"]
    assert trainable and all("lora_" in n for n in trainable)  # connector frozen in stage 2
    assert trainable.keys() == ranks[1]["trainable"].keys()
    for name, weight in trainable.items():  # ... yet identical weights: gradients were all-reduced
        assert torch.equal(weight, ranks[1]["trainable"][name]), name

    stage1 = torch.load(stage1_ckpt, weights_only=True)["state_dict"]
    assert any(not torch.equal(w, stage1[n]) for n, w in trainable.items())  # training moved LoRA
    for key, value in ranks[0]["connector"].items():  # the frozen connector is stage 1's on both ranks
        assert torch.equal(value, stage1[f"model.connector.{key}"]) and torch.equal(value, ranks[1]["connector"][key])
    assert ranks[0]["val_acc"] == ranks[1]["val_acc"]  # validation metrics synced across ranks
    assert len(list(cache.rglob("*.pt"))) == 2 * len(FLAGS)  # train + val tables, built once
