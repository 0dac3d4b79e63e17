"""The scripts the README names run, in a short form, and print what they promise (scripts/real_step.py, which
writes about 9 GB at InternVL3-2B's shapes, is left to its own command, as its docstring says)."""

import re
import subprocess
import sys

import pytest

from .conftest import ROOT


def script(name: str, *argv: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_head_cost_times_the_head_and_its_cross_entropy():
    out = script("head_cost.py", "--rows", "64", "--width", "16", "--vocab", "512")
    assert "64 rows x 16 wide x 512 vocabulary" in out
    for name in ("head matmul", "head + cross-entropy", "cross-entropy alone"):
        assert re.search(rf"^  {re.escape(name)}\s+\d+\.\d ms$", out, re.M), (name, out)


@pytest.mark.slow
def test_data_rss_reads_with_and_without_the_memory_map(tmp_path):
    out = script("data_rss.py", "--images", "300", "--workdir", str(tmp_path))
    rows = re.findall(r"^memory_map (false|true),\s+(\d+) samples read .*private\s+([\d.]+) GiB", out, re.M)
    assert sorted((m, int(n)) for m, n, _ in rows) == [("false", 256), ("false", 4096), ("true", 256), ("true", 4096)]
    assert all(float(private) > 0 for *_, private in rows), out


@pytest.mark.slow
def test_gpu_check_dry_runs_on_the_cpu():
    """The prepared GPU command, as `--cpu` runs it: a stage-1 checkpoint, stage 2 in fp32, then the bench (its
    bf16, DeepSpeed and real-shape parts need CUDA)."""
    out = script("gpu_check.py", "--cpu", "--steps", "2", "--warmup", "1", "--bench-steps", "1")
    assert "--- stage 2: fp32: ok" in out and "--- vitask bench on cpu: ok" in out
    assert re.search(r"^gpu_check: 0 failed;", out, re.M), out[-3000:]
