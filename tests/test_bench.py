"""`vitask bench` (README, "Benchmark") runs end to end and prints its side-by-side ratios and FLOP columns."""

import math
import re

import pytest

from vitask_pl.cli import main

VARIANTS = (
    "vanilla, response-only logits",
    "vanilla, full logits",
    "stage 2, fused views",
    "stage 2, shared prefix",
    "stage 2, three forwards",
)
RATIOS = (
    "stage-2 fused / vanilla, time",
    "stage-2 shared prefix / vanilla, time",
    "stage-2 shared prefix / vanilla, memory",
    "three forwards / fused, memory",
    "score / generate throughput",
)


def bench(capsys, *argv) -> str:
    main(["bench", "--steps", "1", "--batch_size", "2", "--datasets", '["dermamnist", "pneumoniamnist"]', *argv])
    return capsys.readouterr().out


def check(out: str) -> None:
    rows = out.splitlines()
    for name in VARIANTS:  # ms/step, median, memory, GFLOP, time x, FLOP x, time/FLOP: all finite and positive
        cells = next(r for r in rows if r.startswith(name))[len(name) :].split()
        assert len(cells) == 7 and all(math.isfinite(float(c)) and float(c) > 0 for c in cells), (name, cells)
        assert float(cells[0]) <= float(cells[1]), (name, cells)  # ms/step is the fastest round, never above the median
    assert "ratios (same process, same batch):" in out
    for line in RATIOS:
        value = next(row for row in rows if row.strip().startswith(line)).split()[-1]
        assert math.isfinite(float(value)) and float(value) > 0, (line, value)


def test_bench_runs_through_the_cli_and_prints_every_ratio(tiny_dirs, capsys):
    out = bench(capsys, "--vlm", tiny_dirs["internvl"])
    check(out)
    assert "target" not in out  # the targets hold at the proportional preset's shapes, not at 68 tokens


@pytest.mark.slow
def test_proportional_preset_has_the_real_sequence_structure(capsys):
    out = bench(capsys, "--preset", "proportional")
    check(out)
    header = re.search(r"sequence (\d+) tokens \((\d+) image, shared prefix (\d+), .*vocab ([\d,]+)", out)
    assert header, out
    length, image, prefix, vocab = int(header[1]), int(header[2]), int(header[3]), int(header[4].replace(",", ""))
    assert image == 256 and vocab == 32768 and image < prefix < length  # the image is most of the sequence
    assert "shared prefix / vanilla, time (target <= 2.4)" in out and "throughput (target >= 2)" in out


def test_unknown_preset_is_one_line(capsys):
    code = 0
    try:
        main(["bench", "--preset", "huge"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "--preset: 'huge'" in err and "proportional" in err


def test_measure_times_every_variant_once_per_round():
    # A slow spell of the machine must fall on all variants alike, evaluation ones included (timed in rounds of
    # their own, one run's evaluation rows all came out 2.5x slow): the calls interleave, round by round.
    import torch

    from vitask_pl.bench import measure

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("train", "score", "generate")}
    timings = measure(fns, torch.device("cpu"), steps=3, warmup=1)
    assert calls == ["train", "score", "generate"] * 5  # warm-up round, three timed rounds, one memory call each
    assert set(timings) == set(fns) and all(t.fastest <= t.median for t in timings.values())
