"""The unit scheduler behind ``vitask pipeline --jobs``: dependencies first, inputs from finished units, units
side by side in worker processes, each unit's output in its log, a failure named with that log."""

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from vitask_pl.errors import ConfigError
from vitask_pl.jobs import Unit, run_units, threads_per_job


def _stamp(name: str, inputs: list, meet: tuple[str, str] | None = None) -> dict:
    """A unit: print, and return when it ran and in which process. With ``meet = (folder, partner)`` it leaves a
    mark in ``folder`` and waits (up to 60 s) for ``partner``'s: only two units running at once both see it."""
    start = time.time()
    met = None
    if meet is not None:
        folder, partner = Path(meet[0]), meet[1]
        (folder / f"{name}.here").touch()
        deadline = time.time() + 60
        while not (met := (folder / f"{partner}.here").exists()) and time.time() < deadline:
            time.sleep(0.05)
    print(f"unit {name} ran on {inputs}")
    return {"name": name, "inputs": inputs, "start": start, "end": time.time(), "pid": os.getpid(), "met": met}


def _start_method() -> str:
    return multiprocessing.get_start_method()


def _fail(message: str) -> None:
    print("about to fail")
    raise ValueError(message)


def _graph(tmp_path: Path, meet: bool = False) -> dict:
    """a and b independent (with ``meet``, each waits to see the other running); c reads both; d reads c."""

    def unit(name, *deps, partner=None):
        together = (str(tmp_path), partner) if meet and partner else None
        inputs = lambda done: (name, [done[d]["name"] for d in deps], together)  # noqa: E731
        return Unit(_stamp, inputs, deps, log=tmp_path / f"{name}.log", label=name)

    return {"a": unit("a", partner="b"), "b": unit("b", partner="a"), "c": unit("c", "a", "b"), "d": unit("d", "c")}


def test_units_run_after_their_dependencies_with_their_outputs_in_this_process(tmp_path, capsys):
    results = run_units(_graph(tmp_path), jobs=1)

    assert results["c"]["inputs"] == ["a", "b"] and results["d"]["inputs"] == ["c"]
    assert results["c"]["start"] >= max(results["a"]["end"], results["b"]["end"])
    assert {r["pid"] for r in results.values()} == {os.getpid()}
    assert "unit d ran on ['c']" in capsys.readouterr().out  # in this process, output stays on the console
    assert not list(tmp_path.glob("*.log"))


def test_workers_run_independent_units_side_by_side_and_log_each(tmp_path, capsys):
    results = run_units(_graph(tmp_path, meet=True), jobs=2)

    a, b, c, d = (results[k] for k in "abcd")
    assert a["met"] and b["met"]  # a and b ran at the same time: each saw the other's mark
    assert c["start"] >= max(a["end"], b["end"]) and d["start"] >= c["end"]
    assert c["inputs"] == ["a", "b"] and d["inputs"] == ["c"]
    assert os.getpid() not in {r["pid"] for r in results.values()}
    # What a unit prints goes to its own log; the console gets a line per unit started and finished.
    assert (tmp_path / "d.log").read_text() == "unit d ran on ['c']\n"
    console = capsys.readouterr().out
    assert "d: started" in console and "d: finished (4 of 4" in console and "unit d ran" not in console


def test_workers_start_their_children_as_this_process_does():
    # DataLoader workers of a stage in a worker must not be spawned (a fresh torch import per loader per epoch).
    results = run_units({"m": Unit(_start_method, lambda done: ())}, jobs=2)
    assert results["m"] == multiprocessing.get_start_method()


def test_a_failed_unit_stops_the_run_and_names_its_log(tmp_path):
    units = {"x": Unit(_fail, lambda done: ("bad value",), log=tmp_path / "x.log", label="seed0/x")}
    with pytest.raises(ValueError, match="bad value") as error:
        run_units(units, jobs=2)
    assert f"seed0/x: the full output is in {tmp_path / 'x.log'}" in error.value.__notes__
    assert "about to fail" in (tmp_path / "x.log").read_text()


def test_jobs_must_be_positive_and_share_the_cores(monkeypatch):
    with pytest.raises(ConfigError, match="--jobs: 0; use 1"):
        run_units({}, jobs=0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert (threads_per_job(1), threads_per_job(2), threads_per_job(16)) == (8, 4, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_job(2) == 3
