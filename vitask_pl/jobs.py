"""Run a graph of dependent units (the pipeline's stages over seeds), one at a time or in worker processes.

On a CPU the tiny testbed's batches are too small for torch to keep two cores busy inside one process, so two
one-thread processes finish two fits sooner than one two-thread process does one after the other (README, "Stages
side by side"). With ``jobs > 1`` every unit whose dependencies are done goes to the next free worker, first in
the given order, and each worker's torch uses ``cores // jobs`` threads (or ``OMP_NUM_THREADS``). A worker
writes what its unit prints to the unit's log file, so the console shows one line per unit started and finished.

Float results can differ with the thread count (reduction order), never with the schedule: every unit seeds
itself, and its inputs are its dependencies' finished outputs.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from vitask_pl.errors import ConfigError


@dataclass(frozen=True)
class Unit:
    """One piece of work: ``fn(*args(results))`` once every unit named in ``deps`` has finished.

    ``args`` is called in the parent with the results so far (keyed like the units), so a unit reads its
    dependencies' outputs, e.g. a checkpoint path; ``fn`` and what ``args`` returns must pickle. ``log`` receives
    what the unit prints when it runs in a worker.
    """

    fn: Callable
    args: Callable[[dict], tuple]
    deps: tuple[Hashable, ...] = ()
    log: Path | None = None
    label: str = ""


def threads_per_job(jobs: int) -> int:
    """torch threads of each of ``jobs`` workers: ``OMP_NUM_THREADS`` if set, else an equal share of the cores."""

    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // jobs)


def run_units(units: dict[Hashable, Unit], jobs: int = 1, option: str = "--jobs") -> dict:
    """Run every unit after its dependencies; return ``{key: result}``. ``jobs == 1`` runs them in this process
    in the given order (which must list dependencies first); more runs up to ``jobs`` at once in workers."""

    if jobs < 1:
        raise ConfigError(f"{option}: {jobs}; use 1 (run in this process) or more worker processes.")
    for key, unit in units.items():
        missing = [d for d in unit.deps if d not in units]
        if missing:
            raise AssertionError(f"unit {key} depends on {missing}, which are not scheduled")
    results: dict = {}
    if jobs == 1:
        for key, unit in units.items():
            pending = [d for d in unit.deps if d not in results]
            assert not pending, f"unit {key} is listed before its dependencies {pending}"
            results[key] = unit.fn(*unit.args(results))
        return results
    threads = threads_per_job(jobs)
    print(f"[pipeline] {len(units)} units on {jobs} worker processes, {threads} torch thread(s) each")
    context = multiprocessing.get_context("spawn")  # fork would copy this process's torch thread pools
    waiting, running = dict(units), {}
    start = time.monotonic()
    setup = (threads, multiprocessing.get_start_method())
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker, initargs=setup) as pool:
        try:
            while waiting or running:
                for key in [k for k, u in waiting.items() if all(d in results for d in u.deps)]:
                    if len(running) == jobs:
                        break
                    unit = waiting.pop(key)
                    running[pool.submit(_logged, unit.fn, unit.args(results), unit.log)] = key
                    where = f" (log: {unit.log})" if unit.log else ""
                    print(f"[pipeline] {unit.label or key}: started{where}", flush=True)
                if not running:
                    raise AssertionError(f"units {list(waiting)} wait on each other")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    key = running.pop(future)
                    results[key] = _result(future, units[key])
                    elapsed = time.monotonic() - start
                    print(
                        f"[pipeline] {units[key].label or key}: finished ({len(results)} of {len(units)}, "
                        f"{elapsed / 60:.1f} min in)",
                        flush=True,
                    )
        except BaseException:
            for future in running:
                future.cancel()
            raise
    return results


def _result(future: Future, unit: Unit):
    try:
        return future.result()
    except Exception as error:
        if unit.log is not None:  # the worker's traceback is in the unit's log, not on this console
            error.add_note(f"{unit.label}: the full output is in {unit.log}")
        raise


def _worker(threads: int, start_method: str) -> None:
    import torch

    torch.set_num_threads(threads)
    # A spawned process spawns its own children too, so each DataLoader worker would import torch again, every
    # epoch (a 3-epoch TSM fit with 2 loader workers: 93 s in a worker, 11 s once they start as the parent's do).
    multiprocessing.set_start_method(start_method, force=True)


def _logged(fn: Callable, args: tuple, log: Path | None):
    if log is None:
        return fn(*args)
    with _redirected(log):
        return fn(*args)


@contextlib.contextmanager
def _redirected(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr, Python's and C's, to ``log`` (appended: a resumed unit keeps its
    earlier output) until the block ends."""

    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
