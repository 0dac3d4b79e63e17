"""Peak RSS of a process that reads a large MedMNIST-format file, with the images in memory and memory-mapped.

    python scripts/data_rss.py [--images 50000] [--workdir DIR]

Writes one synthetic 224-px file in the MedMNIST layout (``pneumoniamnist_224.npz``: gray, ``--images``
training images, compressed as the official files are), then, each in its own process: builds the data module
for training and reads 256, then 4,096 training samples spread over the split, with ``memory_map: false`` (the
split read whole) and ``memory_map: true`` (its first run makes the one-time conversion). Prints each process's
peak RSS (``wait4``) and, at the end, its private (anonymous) and file-backed RSS from /proc. Mapped file pages
count in RSS but are the OS page cache, stored once however many workers and ranks map them; private memory is
what each process holds for itself. The target: private memory does not grow with the dataset.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READ = """
import sys
import numpy as np
from vitask_pl.data.datamodule import MedMNISTDataModule
dm = MedMNISTDataModule(sys.argv[1], ["pneumoniamnist"], 224, num_workers=0, memory_map=sys.argv[2] == "true")
dm.setup("fit")
ds = dm.dataset("train")
n = int(sys.argv[3])
for i in range(n):
    np.array(ds[i * (len(ds) // n)]["image"])  # what a collate does with a sample's image: a copy
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["RssAnon"].split()[0]) * 1024, int(status["RssFile"].split()[0]) * 1024)
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
    """Run ``argv``; print its peak RSS (wait4) and, when it reports them, its private and file-backed RSS."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        print(out[-3000:], file=sys.stderr)
        raise SystemExit(1)
    row = f"{label:<50} peak RSS {usage.ru_maxrss / 2**20:6.2f} GiB"
    last = out.strip().splitlines()[-1].split() if out.strip() else []
    if len(last) == 2 and all(x.isdigit() for x in last):
        row += f"   private {int(last[0]) / 2**30:5.2f} GiB   file-backed {int(last[1]) / 2**30:5.2f} GiB"
    print(f"{row}   wall {time.monotonic() - start:5.1f} s", flush=True)


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
    shutil.rmtree(work / "cache", ignore_errors=True)  # the first memory-mapped run converts
    for memory_map in ("false", "true"):
        for n in (256, 4096):
            label = f"memory_map {memory_map}, {n:>4} samples read"
            child(label, [sys.executable, "-c", READ, str(data), memory_map, str(n)], env)


if __name__ == "__main__":
    main()
