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
    header = next(r for r in rows if r.startswith("variant")).split()[1:]
    assert header == ["ms/step", "median", "saved", "MiB", "faults", "GFLOP", "time", "x", "FLOP", "x", "time/FLOP"]
    for name in VARIANTS:  # ms/step, median, memory, faults, GFLOP, time x, FLOP x, time/FLOP: all finite
        cells = [float(c) for c in next(r for r in rows if r.startswith(name))[len(name) :].split()]
        assert len(cells) == 8 and all(math.isfinite(c) for c in cells), (name, cells)
        assert all(c > 0 for i, c in enumerate(cells) if i != 3), (name, cells)  # a step may map no fresh page
        assert cells[3] >= 0, (name, cells)
        assert cells[0] <= cells[1], (name, cells)  # ms/step is the fastest round, never above the median
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


def test_measure_interleaves_variants_by_round_and_groups_by_block():
    # A slow spell of the machine must fall on all variants alike: within a group the calls alternate round by
    # round; the groups (training, evaluation) take turns in blocks spread over the run, each block opening with
    # an untimed round, and each group runs under its own mode.
    from contextlib import contextmanager, nullcontext

    import torch

    from vitask_pl.bench import measure

    calls, mode = [], ["train"]

    @contextmanager
    def evaluating():
        mode[0] = "eval"
        yield
        mode[0] = "train"

    def variant(name):
        return lambda: calls.append((name, mode[0]))

    train = {"vanilla": variant("vanilla"), "stage 2": variant("stage 2")}
    evaluation = {"score": variant("score"), "generate": variant("generate")}
    timings = measure([(train, nullcontext), (evaluation, evaluating)], torch.device("cpu"), steps=5, blocks=2)
    round_train = [("vanilla", "train"), ("stage 2", "train")]
    round_eval = [("score", "eval"), ("generate", "eval")]
    block = lambda rounds: round_train * (1 + rounds) + round_eval * (1 + rounds)  # noqa: E731
    assert calls == block(3) + block(2) + round_train + round_eval  # 3 + 2 timed rounds, then one memory call each
    assert set(timings) == {*train, *evaluation}
    assert all(t.fastest <= t.median for t in timings.values())
