import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub name must fail at once, never retry for minutes
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

SMALL_FLAGS = ["dermamnist", "chestmnist", "pneumoniamnist", "organamnist"]  # RGB, multi-label, binary, gray


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """Synthetic MedMNIST files at 28 px for four datasets covering every task type and both channel counts."""
    from vitask_pl.data.synth import synthesize

    root = tmp_path_factory.mktemp("medmnist")
    synthesize(root, SMALL_FLAGS, size=28, per_class=8, seed=0)
    return root
