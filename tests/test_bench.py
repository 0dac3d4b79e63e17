"""`vitask bench` (README, "Benchmark") runs end to end on a tiny model and prints its side-by-side ratios."""

import math

from vitask_pl.cli import main


def test_bench_runs_through_the_cli_and_prints_every_ratio(tiny_dirs, capsys):
    main(
        [
            "bench",
            "--vlm",
            tiny_dirs["internvl"],
            "--steps",
            "1",
            "--batch_size",
            "2",
            "--datasets",
            '["dermamnist", "pneumoniamnist"]',
        ]
    )
    out = capsys.readouterr().out
    assert "ratios (same process, same batch):" in out
    for line in ("stage-2 fused / vanilla, time", "three forwards / fused, memory", "score / generate throughput"):
        value = next(row for row in out.splitlines() if row.strip().startswith(line)).split()[-1]
        assert math.isfinite(float(value)) and float(value) > 0, (line, value)
