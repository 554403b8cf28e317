"""Benchmark group ``size`` (issue 18): what a large stage costs the verbs a user waits for.

For each stage size (10,000 and 100,000 files of 1-4 KiB; ``--sizes`` picks):

* close of 10 changed files, all streamed before close (the watcher on), after the
  open's background check of the stage finished;
* close with no change (the same);
* warm re-open (the cached copy is current: nothing to download);
* the peak RSS of a warm re-open, in a process of its own (``VmHWM``; with
  ``PDAGENT_BENCH_TRACEMALLOC=1`` that process prints its 15 largest allocation sites),
  unwatched, and watched until the open's background check of the plain tree is done
  (what a host's process holds); each child closes unchanged, so the cache stays warm.

Run through ``bench/run.py --only size [--sizes 10000,100000]``. A profile of one
close or re-open is written with ``--profile DIR`` (cProfile, sorted by cumulative time).
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import NotFoundError
from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.store import open_store
from bench.common import median, timed

if TYPE_CHECKING:
    from bench.run import Bench

CHANGED = 10
SIZES = (10_000, 100_000)
TARGETS = {
    10_000: {"close10": 0.5, "reopen": 1.0},
    100_000: {"close10": 1.5, "reopen": 3.0, "rss": 200.0},
}

_RSS_CHILD = """
import json, os, resource, sys, time, tracemalloc
from agent.config import load_config
from agent.session import PlantDesignSession
trace = os.environ.get("PDAGENT_BENCH_TRACEMALLOC") == "1"
watch = sys.argv[3] == "watch"
if trace:
    tracemalloc.start(8)
config = load_config(**json.loads(sys.argv[1]))
s = PlantDesignSession(config, crash_hooks=False)
s.open(sys.argv[2], "bench", "planning", watch=watch, crash_hooks=False)
if watch:  # the background check of the plain tree, as a host's open runs it
    deadline = time.monotonic() + 600
    while s.status().get("stage_check") in (None, "running") and time.monotonic() < deadline:
        time.sleep(0.05)
if trace:
    current, peak = tracemalloc.get_traced_memory()
    print(f"traced now {current / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB", file=sys.stderr)
    for stat in tracemalloc.take_snapshot().statistics("lineno")[:15]:
        print(stat, file=sys.stderr)
# VmHWM: this address space's peak. ru_maxrss is not reset by exec, so a child of a big
# bench process would report its parent's size (it read 640 MiB where VmHWM says 260).
try:
    with open("/proc/self/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except OSError:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
s.close()  # nothing changed: the copy goes back to the cache, the next open is warm too
print(peak_kib)
"""


def _seed(bench: Bench, projekt: str, files: int) -> None:
    store = open_store(bench.config("size-probe"))
    try:
        store.head(StageKeys(projekt, "planning").manifest)
        return  # seeded by an earlier run kept with --keep
    except NotFoundError:
        pass
    finally:
        store.close()
    seed = PlantDesignSession(
        bench.config(f"size-seed-{files}", transfer={"cache_enabled": False, "close_timeout": 3600})
    )
    work = seed.open(projekt, "bench", "planning", watch=False)
    for i in range(files):
        folder = work / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir()
        (folder / f"f{i:06d}.txt").write_bytes(os.urandom(1024 + (i * 7919) % 3072))
    seed.close()


def _wait_streamed(s: PlantDesignSession) -> None:
    """Every change streamed, and the open's background check of the stage finished (in a
    working day both are long done when the user closes; close would wait for them)."""
    assert s.flush(timeout=600), "the changes were not streamed"
    deadline = time.monotonic() + 600
    while s.status().get("stage_check") == "running" and time.monotonic() < deadline:
        time.sleep(0.05)


def _profile(fn: Callable[[], object], where: Path | None, name: str) -> float:
    if where is None:
        return timed(fn)
    where.mkdir(parents=True, exist_ok=True)
    prof = cProfile.Profile()
    started = time.perf_counter()
    prof.runcall(fn)
    took = time.perf_counter() - started
    out = where / f"{name}.txt"
    with out.open("w") as fh:
        pstats.Stats(prof, stream=fh).sort_stats("cumulative").print_stats(40)
    print(f"[profile of {name}: {out}]", file=sys.stderr)
    return took


def _rss_of_open(bench: Bench, name: str, projekt: str, *, watch: bool) -> float:
    """MiB: the peak RSS of a process that re-opens the stage (warm; ``watch``: watched,
    until the background check of the plain tree is done), measured before it closes."""
    config = bench.config(name)
    sections = {
        "store": {
            "url": config.store.url,
            "endpoint_url": config.store.endpoint_url,
            "region": "us-east-1",
        },
        "paths": {"base_dir": str(config.paths.base_dir)},
        "lock": {"heartbeat_interval": 3600, "stale_after": 7200},
    }
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _RSS_CHILD,
            json.dumps(sections),
            projekt,
            "watch" if watch else "no-watch",
        ],
        env={**bench.env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        check=True,
    )
    if out.stderr.strip():
        print(out.stderr, file=sys.stderr)  # PDAGENT_BENCH_TRACEMALLOC=1: where it went
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # Linux: KiB


def bench_size(bench: Bench, sizes: tuple[int, ...] = SIZES, profile: Path | None = None) -> None:
    """Close and re-open at 10,000 and 100,000 files."""
    for files in sizes:
        projekt = f"Size_{files}"
        started = time.monotonic()
        _seed(bench, projekt, files)
        print(f"[size: {files} files seeded in {time.monotonic() - started:.0f}s]", file=sys.stderr)
        user = f"size-user-{files}"
        close10: list[float] = []
        close0: list[float] = []
        reopen: list[float] = []
        first = PlantDesignSession(bench.config(user))
        first.open(projekt, "bench", "planning", watch=False)
        first.close()  # the cache now holds the copy: every open below is warm
        for run in range(bench.runs):
            s = PlantDesignSession(bench.config(user))
            reopen.append(
                _profile(
                    partial(s.open, projekt, "bench", "planning"),
                    profile if run == 0 else None,
                    f"reopen-{files}",
                )
            )
            work = s.work_path
            assert work is not None
            for i in range(CHANGED):
                n = (run * CHANGED + i) % files
                path = work / f"d{n // 1000:03d}" / f"f{n:06d}.txt"
                path.write_bytes(os.urandom(2048))
            _wait_streamed(s)
            close10.append(_profile(s.close, profile if run == 0 else None, f"close10-{files}"))
            s = PlantDesignSession(bench.config(user))
            s.open(projekt, "bench", "planning")
            _wait_streamed(s)
            close0.append(_profile(s.close, profile if run == 0 else None, f"close0-{files}"))
        rss = _rss_of_open(bench, user, projekt, watch=False)
        rss_watched = _rss_of_open(bench, user, projekt, watch=True)
        target = TARGETS.get(files, {})
        table = f"size: a stage of {files:,} files (1-4 KiB)"

        def note(key: str, unit: str = "s", target: dict[str, float] = target) -> str:
            return f"target <= {target[key]:g} {unit}" if key in target else ""

        bench.add(table, "close of 10 streamed changes", median(close10), note("close10"))
        bench.add(table, "close with no change", median(close0), "")
        bench.add(table, "warm re-open", median(reopen), note("reopen"))
        bench.add(table, "re-open peak RSS (MiB, not s)", rss, note("rss", "MiB"))
        bench.add(
            table,
            "watched re-open and its stage check, peak RSS (MiB)",
            rss_watched,
            note("rss", "MiB"),
        )
