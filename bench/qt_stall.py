"""GUI stall during a 1,000-file open and close through ``agent.qt`` (issue 10).

Usage::

    python bench/qt_stall.py [--files 1000] [--size 65536] [--runs 3] [--edits 1000]

Starts SeaweedFS on loopback, seeds a stage with ``--files`` files, then, in an
offscreen ``QApplication``, opens the stage through ``SessionAdapter``, changes
``--edits`` files and closes it, while a 10 ms ``QTimer`` ticks on the GUI
thread. Prints, per phase, the largest gap between ticks (the longest the GUI
thread could not run) and the 99th percentile. Measured only, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QEventLoop, QTimer
from PySide6.QtWidgets import QApplication

from agent.config import AgentConfig, load_config
from agent.qt import SessionAdapter, uninstall_crash_handling
from agent.session import PlantDesignSession
from tests.servers import SeaweedServer

P, STAGE = "Kraftwerk_1234567", "planning"


class Ticks:
    """A 10 ms timer on the GUI thread; gaps between its ticks, per phase."""

    def __init__(self) -> None:
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.last = time.perf_counter()
        self.gaps: list[float] = []

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append((now - self.last) * 1000)
        self.last = now

    def start(self) -> None:
        self.gaps = []
        self.last = time.perf_counter()
        self.timer.start()

    def stop(self) -> dict[str, float]:
        self.timer.stop()
        gaps = sorted(self.gaps) or [0.0]
        return {
            "max_ms": round(gaps[-1], 1),
            "p99_ms": round(gaps[int(len(gaps) * 0.99) - 1 if len(gaps) > 1 else 0], 1),
            "ticks": len(self.gaps),
        }


def _config(env: dict[str, str], base: Path) -> AgentConfig:
    return load_config(
        store={
            "url": env["AGENT_STORE__URL"],
            "endpoint_url": env["AGENT_STORE__ENDPOINT_URL"],
            "region": "us-east-1",
        },
        paths={"base_dir": str(base)},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
        transfer={"cache_enabled": False},
    )


def _wait(adapter: SessionAdapter, app: QApplication) -> tuple[str, object]:
    loop = QEventLoop()
    got: list[tuple[str, object]] = []

    def done(name: str, result: object) -> None:
        got.append((name, result))
        loop.quit()

    adapter.finished.connect(done)
    adapter.failed.connect(done)
    loop.exec()
    adapter.finished.disconnect(done)
    adapter.failed.disconnect(done)
    return got[0]


def main() -> None:
    """Seed, then measure open and close through the adapter."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    app = QApplication([])
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp, SeaweedServer() as server:
        server.create_bucket("stallbench")
        env = {**server.env(), "AGENT_STORE__URL": "s3://stallbench/p"}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ[name] = env[name]
        seeder = PlantDesignSession(_config(env, Path(tmp) / "seed"))
        work = seeder.open(P, "seeder", STAGE, watch=False)
        for i in range(args.files):
            (work / f"d{i % 20}").mkdir(exist_ok=True)
            (work / f"d{i % 20}" / f"f{i}.bin").write_bytes(os.urandom(args.size))
        seeder.close()
        for run in range(args.runs):
            config = _config(env, Path(tmp) / f"run{run}")
            adapter = SessionAdapter(session_factory=partial(PlantDesignSession, config))
            ticks = Ticks()
            ticks.start()
            started = time.perf_counter()
            adapter.open(P, "admin", STAGE)
            name, path = _wait(adapter, app)
            open_s = time.perf_counter() - started
            opened = ticks.stop()
            assert name == "open", path
            assert isinstance(path, Path)
            for f in sorted(path.rglob("*.bin"))[: args.edits]:
                f.write_bytes(os.urandom(args.size))
            ticks.start()
            started = time.perf_counter()
            adapter.close()
            name, report = _wait(adapter, app)
            close_s = time.perf_counter() - started
            closed = ticks.stop()
            assert name == "close", report
            results.append(
                {
                    "run": run,
                    "open_s": round(open_s, 2),
                    "open": opened,
                    "close_s": round(close_s, 2),
                    "close": closed,
                }
            )
        uninstall_crash_handling()
    print(json.dumps(results, indent=1))
    print(
        f"GUI stall (max ms between 10 ms ticks), {args.files} x {args.size // 1024} KiB: "
        f"open median {statistics.median(r['open']['max_ms'] for r in results)} ms "  # type: ignore[index]
        f"(worst {max(r['open']['max_ms'] for r in results)}), "  # type: ignore[index]
        f"close of {args.edits} changes median "
        f"{statistics.median(r['close']['max_ms'] for r in results)} ms "  # type: ignore[index]
        f"(worst {max(r['close']['max_ms'] for r in results)})"  # type: ignore[index]
    )


if __name__ == "__main__":
    main()
