"""Peak RSS of a process that reads a large MedMNIST-format file, with the images in memory and memory-mapped.

    python scripts/data_rss.py [--images 50000] [--workdir DIR]

Writes one synthetic 224-px file in the MedMNIST layout (``pneumoniamnist_224.npz``: gray, ``--images``
training images, compressed as the official files are), then, each in its own process: builds the data module
for training and reads 256 training samples, once with ``memory_map: false`` (the split read whole) and twice
with ``memory_map: true`` (first run: the one-time conversion; second run: the converted file). Prints each
process's peak RSS (``wait4``). The target: with the memory map, the peak does not grow with the dataset.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READ = """
import sys
from vitask_pl.data.datamodule import MedMNISTDataModule
dm = MedMNISTDataModule(sys.argv[1], ["pneumoniamnist"], 224, num_workers=0, memory_map=sys.argv[2] == "true")
dm.setup("fit")
ds = dm.dataset("train")
total = sum(int(ds[i * (len(ds) // 256)]["image"].sum() > 0) for i in range(256))
print(len(ds), total)
"""

WRITE = """
import sys, numpy as np
n = int(sys.argv[2])
x = np.zeros((n, 224, 224), np.uint8)
for i in range(0, n, 1000):  # a stripe pattern per image: compresses as medical images do, not as noise
    k = np.arange(i, min(n, i + 1000))
    x[i : i + len(k)] = ((np.arange(224)[None, None, :] + k[:, None, None]) % 256).astype(np.uint8)
labels = (np.arange(n) % 2)[:, None]
small = x[:100]
np.savez_compressed(sys.argv[1], train_images=x, train_labels=labels, val_images=small,
                    val_labels=labels[:100], test_images=small, test_labels=labels[:100])
"""


def child(label: str, argv: list[str], env: dict) -> None:
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        print(out[-3000:], file=sys.stderr)
        raise SystemExit(1)
    print(f"{label:<44} peak RSS {usage.ru_maxrss / 2**20:7.2f} GiB   wall {time.monotonic() - start:6.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitask-rss-"))
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VITASK_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    path = data / "pneumoniamnist_224.npz"
    if not path.is_file():
        child(
            f"write {args.images:,} images at 224 px", [sys.executable, "-c", WRITE, str(path), str(args.images)], env
        )
    raw = args.images * 224 * 224
    print(f"{path}: {path.stat().st_size / 2**30:.2f} GiB on disk, {raw / 2**30:.2f} GiB of training images")
    child("read 256 samples, memory_map false", [sys.executable, "-c", READ, str(data), "false"], env)
    child("read 256 samples, memory_map true (converts)", [sys.executable, "-c", READ, str(data), "true"], env)
    child("read 256 samples, memory_map true (converted)", [sys.executable, "-c", READ, str(data), "true"], env)


if __name__ == "__main__":
    main()
