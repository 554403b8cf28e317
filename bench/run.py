"""Benchmarks: the agent beside s5cmd, rclone and the AWS CLI, on a SeaweedFS started here.

Usage::

    python bench/run.py                 # everything, 5 runs each
    python bench/run.py --runs 3 --only core,stream,resume,folder,history
    python bench/run.py --runs 3 --only core --link office   # core through the office link only

The core group runs twice by default: on loopback, and through the tests' fault
proxy as an office link (15 ms each way, 100 Mbit/s shared), the agent and s5cmd
alike (``--link loopback,office``).

Prints markdown tables (medians of the runs; ratios to s5cmd or to a cold open).
Nothing here is a test: speed is never asserted, only measured side by side.
The agent's figures are library calls in this process (no interpreter start);
the tools' figures are whole processes, as a user runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import AgentConfig, load_config
from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.store import open_store
from agent.store.base import ObjectStore
from bench.common import median, timed
from bench.history import bench_history
from bench.link import LinkProxy
from bench.size import SIZES, bench_size
from tests.faultproxy import OFFICE_LINK, LinkProfile
from tests.servers import SeaweedServer

BUCKET = "bench"
KiB, MiB = 1024, 1024 * 1024
LINKS: dict[str, LinkProfile | None] = {"loopback": None, "office": OFFICE_LINK}


def link_label(profile: LinkProfile) -> str:
    """``office link (15 ms, 100 Mbit/s)``."""
    rate = f"{profile.bytes_per_second * 8 / 1e6:.0f} Mbit/s" if profile.bytes_per_second else ""
    return f"office link ({profile.latency * 1000:.0f} ms, {rate})"


def tool(name: str) -> str:
    """A tool from this interpreter's bin folder (the venv), else PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def make_files(root: Path, count: int, size: int) -> None:
    """``count`` random files of ``size`` bytes."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"f{i:05d}.bin").write_bytes(os.urandom(size))


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the block."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


class Bench:
    """Shared state: the server, environment and a scratch folder."""

    def __init__(
        self,
        server: SeaweedServer,
        scratch: Path,
        runs: int,
        links: tuple[str, ...] = ("loopback",),
    ) -> None:
        self.server = server
        self.scratch = scratch
        self.runs = runs
        self.links = links
        self.env = {**os.environ, **server.env()}
        os.environ.update(server.env())
        self.rows: dict[str, list[tuple[str, float, str]]] = {}
        # The store's CPU seconds per measured step, by name (see ``timed_with_store``).
        self.store_cpu: dict[str, list[float]] = {}

    def timed_with_store(self, name: str, fn: Callable[[], object]) -> float:
        """``timed(fn)``, and the CPU time the store's process spent meanwhile under
        ``name`` (on two shared cores, the server's work is part of what a user waits for)."""
        before = self.server.cpu_seconds()
        seconds = timed(fn)
        after = self.server.cpu_seconds()
        if before is not None and after is not None:
            self.store_cpu.setdefault(name, []).append(after - before)
        return seconds

    def config(self, name: str, endpoint: str | None = None, **sections: object) -> AgentConfig:
        """A config on the bench bucket with its own base folder (``endpoint``: a proxy)."""
        # The environment wins over code in load_config, and it names the server itself.
        with _env("AGENT_STORE__ENDPOINT_URL", endpoint or self.server.endpoint):
            return load_config(
                store={
                    "url": f"s3://{BUCKET}/agent",
                    "endpoint_url": endpoint or self.server.endpoint,
                    "region": "us-east-1",
                },
                paths={"base_dir": str(self.scratch / "agent" / name)},
                lock={"heartbeat_interval": 3600, "stale_after": 7200},
                **sections,  # type: ignore[arg-type]
            )

    def sh(self, *argv: str) -> None:
        """Run a tool quietly; fail loudly."""
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr[-2000:]}")

    def add(self, table: str, label: str, seconds: float, note: str = "") -> None:
        """Record one median."""
        self.rows.setdefault(table, []).append((label, seconds, note))


# ----------------------------------------------------------------------------- core


def seed_stage(bench: Bench, projekt: str, source: Path) -> None:
    """Commit ``source`` as the stage's working copy through the agent."""
    session = PlantDesignSession(bench.config(f"seed-{projekt}", transfer={"cache_enabled": False}))
    work = session.open(projekt, "bench", "planning", watch=False)
    for f in source.iterdir():
        shutil.copyfile(f, work / f.name)
    session.close()


def agent_cycle(
    bench: Bench, projekt: str, endpoint: str | None = None, tag: str = ""
) -> dict[str, list[float]]:
    """Cold opens, full closes (every file changed) and re-opens of an unchanged copy.

    ``close_streamed``: a second full close, of the re-opened copy, after every change
    was streamed while the session ran (what a user waits for at the end of a day).
    ``endpoint``: the store's address to use (a link proxy), ``tag`` its own base folder.
    """
    out: dict[str, list[float]] = {"cold": [], "close": [], "reopen": [], "close_streamed": []}
    name = _cycle_name(projekt, tag)

    def change_all(work: Path) -> None:
        for f in work.iterdir():
            with f.open("r+b") as fh:
                fh.write(os.urandom(16))

    for _ in range(bench.runs):
        config = bench.config(name, endpoint)
        shutil.rmtree(config.paths.cache_dir, ignore_errors=True)
        s = PlantDesignSession(config)
        out["cold"].append(timed(partial(s.open, projekt, "bench", "planning", watch=False)))
        assert s.work_path is not None
        change_all(s.work_path)
        out["close"].append(bench.timed_with_store(f"close{name}", s.close))
        s2 = PlantDesignSession(config)
        out["reopen"].append(timed(partial(s2.open, projekt, "bench", "planning", watch=False)))
        assert s2.work_path is not None
        s2.start_streaming()  # the editor's day: every save streamed while it runs
        change_all(s2.work_path)
        assert s2.flush(timeout=600), "the changes were not streamed"
        out["close_streamed"].append(bench.timed_with_store(f"close_streamed{name}", s2.close))
    return out


def tool_cycle(
    bench: Bench,
    projekt: str,
    source: Path,
    *,
    endpoint: str | None = None,
    only: tuple[str, ...] = ("s5cmd", "rclone", "aws"),
    tag: str = "",
) -> dict[str, tuple[list[float], list[float]]]:
    """Download and upload times of s5cmd, rclone and aws (``only``) on the same data."""
    ep = endpoint or bench.server.endpoint
    remote = f"s3://{BUCKET}/agent/{projekt}/planning"
    out: dict[str, tuple[list[float], list[float]]] = {}
    rclone_flags = [
        "--s3-provider",
        "Other",
        "--s3-endpoint",
        ep,
        "--s3-access-key-id",
        bench.server.access_key,
        "--s3-secret-access-key",
        bench.server.secret_key,
        "--s3-region",
        "us-east-1",
        "--config",
        os.devnull,
        "--transfers",
        "10",
        "--checkers",
        "10",
    ]
    cmds: dict[str, tuple[Callable[[Path], list[str]], Callable[[str], list[str]]]] = {
        "s5cmd": (
            lambda d: [
                tool("s5cmd"),
                "--endpoint-url",
                ep,
                "--numworkers",
                "10",
                "cp",
                f"{remote}/*",
                f"{d}/",
            ],
            lambda dst: [
                tool("s5cmd"),
                "--endpoint-url",
                ep,
                "--numworkers",
                "10",
                "cp",
                f"{source}/*",
                f"{dst}/",
            ],
        ),
        "rclone": (
            lambda d: [
                tool("rclone"),
                "copy",
                *rclone_flags,
                f":s3:{BUCKET}/agent/{projekt}/planning",
                str(d),
            ],
            lambda dst: [
                tool("rclone"),
                "copy",
                *rclone_flags,
                str(source),
                ":s3:" + dst.removeprefix("s3://"),
            ],
        ),
        "aws": (
            lambda d: [
                tool("aws"),
                "s3",
                "cp",
                "--recursive",
                "--only-show-errors",
                "--endpoint-url",
                ep,
                remote,
                str(d),
            ],
            lambda dst: [
                tool("aws"),
                "s3",
                "cp",
                "--recursive",
                "--only-show-errors",
                "--endpoint-url",
                ep,
                str(source),
                dst,
            ],
        ),
    }
    for name, (down, up) in cmds.items():
        if name not in only:
            continue
        downs, ups = [], []
        for run in range(bench.runs):
            dest = bench.scratch / f"dl-{name}-{projekt}{tag}-{run}"
            downs.append(timed(partial(bench.sh, *down(dest))))
            shutil.rmtree(dest, ignore_errors=True)
            target = f"s3://{BUCKET}/tools{tag}/{name}/{projekt}/{run}"
            ups.append(
                bench.timed_with_store(f"{name}-up{projekt}{tag}", partial(bench.sh, *up(target)))
            )
        out[name] = (downs, ups)
    return out


def bench_core(bench: Bench) -> None:
    """Issue 2: open / close / re-open beside s5cmd, rclone and aws.

    Issue 18: the same cycle, the agent beside s5cmd, through the office link
    (``OFFICE_LINK`` in the tests' fault proxy, in front of the same SeaweedFS).
    """
    for projekt, count, size, label in (
        ("Small", 1000, 64 * KiB, "1000 x 64 KiB"),
        ("Big", 4, 64 * MiB, "4 x 64 MiB"),
    ):
        source = bench.scratch / f"src-{projekt}"
        make_files(source, count, size)
        seed_stage(bench, projekt, source)
        loopback: dict[str, float] = {}
        if "loopback" in bench.links:
            loopback = core_loopback(bench, projekt, source, label)
        for link in bench.links:
            profile = LINKS[link]
            if profile is not None:
                core_through(
                    bench, projekt, source, label, link=link, profile=profile, loopback=loopback
                )


def _core_rows(
    cycle: dict[str, list[float]], s5_down: float, s5_up: float
) -> list[tuple[str, str, float, float]]:
    """(row, unit, seconds, ratio) of the agent's core measurements."""
    cold, close, reopen = median(cycle["cold"]), median(cycle["close"]), median(cycle["reopen"])
    streamed = median(cycle["close_streamed"])
    return [
        ("agent open (cold)", "x s5cmd download", cold, cold / s5_down),
        ("agent close (all changed)", "x s5cmd upload", close, close / s5_up),
        (
            "agent close (all changed, streamed before)",
            "x s5cmd upload",
            streamed,
            streamed / s5_up,
        ),
        ("agent re-open (unchanged)", "x cold open", reopen, reopen / cold),
    ]


def core_loopback(bench: Bench, projekt: str, source: Path, label: str) -> dict[str, float]:
    """The loopback table of one data set; returns the agent's ratios by row label."""
    cycle = agent_cycle(bench, projekt)
    tools = tool_cycle(bench, projekt, source)
    s5_down, s5_up = (median(v) for v in tools["s5cmd"])
    table = f"core: {label}"
    ratios: dict[str, float] = {}
    for row, unit, seconds, ratio in _core_rows(cycle, s5_down, s5_up):
        digits = 3 if unit == "x cold open" else 2
        bench.add(table, row, seconds, f"{ratio:.{digits}f} {unit}")
        ratios[row] = ratio
    for name, (downs, ups) in tools.items():
        bench.add(
            table, f"{name} download", median(downs), f"{median(downs) / s5_down:.2f} x s5cmd"
        )
        bench.add(table, f"{name} upload", median(ups), f"{median(ups) / s5_up:.2f} x s5cmd")
    # Where a loopback close's time goes on two shared cores: the store's own CPU.
    s5_cpu = bench.store_cpu.get(f"s5cmd-up{projekt}")
    for row, key in (
        ("store CPU s, agent close (all changed)", f"close{_cycle_name(projekt)}"),
        ("store CPU s, agent close (streamed before)", f"close_streamed{_cycle_name(projekt)}"),
        ("store CPU s, s5cmd upload", f"s5cmd-up{projekt}"),
    ):
        cpu = bench.store_cpu.get(key)
        if cpu and s5_cpu:
            bench.add(table, row, median(cpu), f"{median(cpu) / median(s5_cpu):.2f} x s5cmd's")
    return ratios


def _cycle_name(projekt: str, tag: str = "") -> str:
    return f"cycle-{projekt}{tag}"


def core_through(
    bench: Bench,
    projekt: str,
    source: Path,
    label: str,
    *,
    link: str,
    profile: LinkProfile,
    loopback: dict[str, float],
) -> None:
    """The agent and s5cmd through a link proxy; each ratio beside its loopback one."""
    # The proxy in a process of its own: in this one it would share the GIL with the
    # agent measured here, and not with s5cmd (bench/link.py).
    with LinkProxy(bench.server.endpoint, profile) as proxy:
        cycle = agent_cycle(bench, projekt, proxy.endpoint, tag=f"-{link}")
        agent_requests = proxy.requests()
        if not agent_requests:
            raise RuntimeError("the agent did not go through the link proxy")
        tools = tool_cycle(
            bench, projekt, source, endpoint=proxy.endpoint, only=("s5cmd",), tag=f"-{link}"
        )
        if proxy.requests() == agent_requests:
            raise RuntimeError("s5cmd did not go through the link proxy")
    s5_down, s5_up = (median(v) for v in tools["s5cmd"])
    table = f"core, {link_label(profile)}: {label}"
    for row, unit, seconds, ratio in _core_rows(cycle, s5_down, s5_up):
        digits = 3 if unit == "x cold open" else 2
        note = f"{ratio:.{digits}f} {unit}"
        if row in loopback:
            note += f" (loopback: {loopback[row]:.{digits}f})"
        bench.add(table, row, seconds, note)
    bench.add(table, "s5cmd download", s5_down, "1.00 x s5cmd")
    bench.add(table, "s5cmd upload", s5_up, "1.00 x s5cmd")


# --------------------------------------------------------------------------- stream


def wait_until(predicate: Callable[[], bool], timeout: float = 120.0, step: float = 0.005) -> float:
    """Poll ``predicate``; return when it became true (monotonic time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(step)
    raise TimeoutError("condition not reached")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def staged_keys(store: ObjectStore, prefix: str) -> set[str]:
    """Keys under ``prefix`` (``.objects/``: the sha256s sent), without the prefix."""
    return {o.key[len(prefix) :] for o in store.list(prefix)}


@contextmanager
def watching_session(bench: Bench, projekt: str, name: str) -> Iterator[PlantDesignSession]:
    """An open, watching session on ``projekt`` (aborted afterwards)."""
    s = PlantDesignSession(bench.config(name))
    s.open(projekt, "bench", "planning")
    try:
        yield s
    finally:
        if not s.is_closed:
            s.abort()


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_stream(bench: Bench) -> None:
    """Issue 3: save-to-staged latency, close with pending work, idle cost, streaming rate."""
    table = "stream: save-to-staged latency (default debounce 0.3 s)"
    store = open_store(bench.config("probe"))
    with watching_session(bench, "Stream", "stream") as s:
        assert s.record is not None and s.work_path is not None
        keys = StageKeys("Stream", "planning")
        prefix = keys.objects_prefix  # content is sent by its sha256
        single: list[float] = []
        for i in range(10 * bench.runs // 5 or 10):
            path = s.work_path / f"single{i}.txt"
            data = os.urandom(4 * KiB)
            path.write_bytes(data)
            t0 = time.monotonic()
            single.append(wait_until(partial(_has_key, store, prefix, _sha(data))) - t0)
        bench.add(table, "single save p50", pct(single, 0.5))
        bench.add(table, "single save p99", pct(single, 0.99))
        repeated: list[float] = []
        for r in range(3):
            path = s.work_path / f"repeat{r}.txt"
            for k in range(20):
                path.write_bytes(f"{r}:{k}".encode() * 100)
                time.sleep(0.1)  # the scenario: one file saved 20 times in 2 s
            t0 = time.monotonic()
            final = f"{r}:{19}".encode() * 100
            key = keys.version(_sha(final))
            repeated.append(wait_until(partial(_body_is, store, key, final)) - t0)
        bench.add(table, "one file saved 20x in 2 s, p50", pct(repeated, 0.5))
        batch: list[float] = []
        t0 = time.monotonic()
        names: dict[str, str] = {}
        for i in range(100):
            data = os.urandom(16 * KiB)
            (s.work_path / f"batch{i}.bin").write_bytes(data)
            names[_sha(data)] = f"batch{i}.bin"
        t_written = time.monotonic()
        pending = set(names)
        while pending:
            now_staged = staged_keys(store, prefix)
            for name in list(pending):
                if name in now_staged:
                    batch.append(time.monotonic() - t_written)
                    pending.discard(name)
            time.sleep(0.005)
        bench.add(table, "100 files at once p50", pct(batch, 0.5))
        bench.add(
            table, "100 files at once p99", pct(batch, 0.99), f"written in {t_written - t0:.2f}s"
        )
    store.close()
    bench_close_pending(bench)
    bench_stream_rate(bench)


def _cli_open(env: dict[str, str], projekt: str, user: str) -> subprocess.CompletedProcess[str]:
    """``agent open PROJEKT --user USER --stage planning --json`` as a process."""
    argv = [sys.executable, "-m", "agent", "open", projekt, "--user", user, "--stage", "planning"]
    return subprocess.run([*argv, "--json"], env=env, capture_output=True, text=True, check=True)


def _gone(pid: int) -> bool:
    from agent.platform import pid_alive

    return not pid_alive(pid)


def _drained(s: PlantDesignSession, uploads: int) -> bool:
    st = s.status()
    return (
        st.get("pending") == 0
        and st.get("in_flight") == 0
        and int(str(st.get("uploads", 0))) >= uploads
    )


def _has_key(store: ObjectStore, prefix: str, name: str) -> bool:
    return name in staged_keys(store, prefix)


def _body_is(store: ObjectStore, key: str, body: bytes) -> bool:
    try:
        return store.get(key).body == body
    except Exception:  # noqa: BLE001 - not there yet
        return False


def bench_close_pending(bench: Bench) -> None:
    """close on 10,000- and 100-file copies with 0, 10 and 1000 changes still pending."""
    table = "stream: close with pending changes"
    for projekt, count in (("Ten_k", 10_000), ("Hundred", 100)):
        source = bench.scratch / f"src-{projekt}"
        make_files(source, count, 1 * KiB)
        seed_stage(bench, projekt, source)
        for pending in (0, 10, 1000):
            if pending > count:
                continue
            times = []
            for _ in range(max(1, bench.runs // 2)):
                s = PlantDesignSession(bench.config(f"close-{projekt}"))
                work = s.open(projekt, "bench", "planning")
                assert s.flush(timeout=120)
                for i in range(pending):
                    (work / f"f{i:05d}.bin").write_bytes(os.urandom(1 * KiB))
                times.append(timed(s.close))
            bench.add(table, f"{count} files, {pending} pending", median(times))


def bench_stream_rate(bench: Bench) -> None:
    """1000 x 64 KiB saved at once: streaming rate beside a bulk close of the same files."""
    table = "stream: 1000 x 64 KiB saved at once"
    stream_t, bulk_t = [], []
    for run in range(max(1, bench.runs // 2)):
        with watching_session(bench, "Rate", f"rate{run}") as s:
            assert s.work_path is not None
            t0 = time.monotonic()
            for i in range(1000):
                (s.work_path / f"r{i:04d}.bin").write_bytes(os.urandom(64 * KiB))
            wait_until(
                partial(_drained, s, 1000),
                timeout=300,
                step=0.02,
            )
            stream_t.append(time.monotonic() - t0)
        b = PlantDesignSession(bench.config(f"bulk{run}"))
        work = b.open("Bulk", "bench", "planning", watch=False)
        for i in range(1000):
            (work / f"r{i:04d}.bin").write_bytes(os.urandom(64 * KiB))
        bulk_t.append(timed(b.close))
    bench.add(
        table,
        "streamed (write to all staged)",
        median(stream_t),
        f"{median(bulk_t) / median(stream_t):.2f} x bulk rate",
    )
    bench.add(table, "bulk upload via close", median(bulk_t))
    bench_idle(bench)


def bench_idle(bench: Bench) -> None:
    """CPU and memory of the background agent watching 10,000 files, idle for 10 s."""
    table = "stream: idle background agent, 10,000 files"
    env = {
        **bench.env,
        "AGENT_STORE__URL": f"s3://{BUCKET}/agent",
        "AGENT_PATHS__BASE_DIR": str(bench.scratch / "agent" / "idle"),
    }
    opened = _cli_open(env, "Ten_k", "idle")
    import json

    pid = int(json.loads(opened.stdout)["agent_pid"])
    time.sleep(3)  # let start-up work finish before sampling idle cost
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    c0, t0 = cpu(), time.monotonic()
    time.sleep(10)
    c1, t1 = cpu(), time.monotonic()
    rss = (
        int(
            next(
                line
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmRSS")
            ).split()[1]
        )
        / 1024
    )
    subprocess.run(
        [sys.executable, "-m", "agent", "abort"], env=env, capture_output=True, check=True
    )
    bench.add(table, "CPU (% of one core)", 100 * (c1 - c0) / (t1 - t0))
    bench.add(table, "resident memory (MiB)", rss)


# --------------------------------------------------------------------------- resume


def bench_resume(bench: Bench) -> None:
    """Issue 4: resume a 10,000-file session with 10 and 1000 pending, beside opens."""
    table = "resume: 10,000-file session"
    import json
    import signal

    source = bench.scratch / "src-Resume"
    make_files(source, 10_000, 1 * KiB)
    seed_stage(bench, "Resume", source)
    cold, reopen = [], []
    for _ in range(max(1, bench.runs // 2)):
        config = bench.config("resume-open")
        shutil.rmtree(config.paths.cache_dir, ignore_errors=True)
        s = PlantDesignSession(config)
        cold.append(timed(partial(s.open, "Resume", "bench", "planning", watch=False)))
        s.close()
        s = PlantDesignSession(config)
        reopen.append(timed(partial(s.open, "Resume", "bench", "planning", watch=False)))
        s.close()
    bench.add(table, "cold open", median(cold))
    bench.add(table, "re-open unchanged", median(reopen))
    for pending in (10, 1000):
        times, flushed = [], []
        for run in range(max(1, bench.runs // 2)):
            base = bench.scratch / "agent" / f"resume-{pending}-{run}"
            env = {
                **bench.env,
                "AGENT_STORE__URL": f"s3://{BUCKET}/agent",
                "AGENT_PATHS__BASE_DIR": str(base),
            }
            out = _cli_open(env, "Resume", "bench")
            info = json.loads(out.stdout)
            os.kill(int(info["agent_pid"]), signal.SIGKILL)
            wait_until(partial(_gone, int(info["agent_pid"])), timeout=30, step=0.01)
            work = Path(info["path"])
            for i in range(pending):
                (work / f"f{i:05d}.bin").write_bytes(os.urandom(1 * KiB))
            config = load_config(
                store={
                    "url": f"s3://{BUCKET}/agent",
                    "endpoint_url": bench.server.endpoint,
                    "region": "us-east-1",
                },
                paths={"base_dir": str(base)},
                lock={"heartbeat_interval": 3600, "stale_after": 7200},
            )
            s = PlantDesignSession(config)
            t = time.perf_counter()
            s.resume(watch=False)
            times.append(time.perf_counter() - t)
            s.flush(timeout=300)
            flushed.append(time.perf_counter() - t)
            s.abort()
        bench.add(
            table,
            f"resume, {pending} pending (to ACTIVE)",
            median(times),
            f"{median(times) / median(reopen):.2f} x re-open unchanged",
        )
        bench.add(
            table,
            f"resume, {pending} pending (all replayed)",
            median(flushed),
            f"{median(flushed) / median(reopen):.2f} x re-open unchanged",
        )


# --------------------------------------------------------------------------- folder


def _folder_tree(root: Path, count: int) -> None:
    """``count`` files of 4 KiB in 20 subfolders of ``root/pkg``."""
    for i in range(count):
        path = root / "pkg" / f"sub{i % 20:02d}" / f"f{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(4 * KiB))


def _git_clone(src: Path, dest: Path) -> None:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    if not (src / ".git").exists():
        subprocess.run(["git", "init", "-q", str(src)], check=True, env=env)
        subprocess.run(["git", "-C", str(src), "add", "-A"], check=True, env=env)
        ident = ["-c", "user.name=b", "-c", "user.email=b@b"]
        subprocess.run(
            ["git", *ident, "-C", str(src), "commit", "-q", "-m", "x"], check=True, env=env
        )
    subprocess.run(["git", "clone", "-q", str(src), str(dest / "repo")], check=True, env=env)


def _counting(real: Callable[..., object], sent: list[str]) -> Callable[..., object]:
    def counting(key: str, path: Path, **kw: object) -> object:
        sent.append(key)
        return real(key, path, **kw)

    return counting


def bench_folder(bench: Bench) -> None:
    """Issue 8: folder operations into a watched copy: uploads per file, time to all staged."""
    import zipfile

    from agent.folder.transfer import Transfers, Upload

    table = "folder: 2000 x 4 KiB into a watched copy"
    count = 2000
    src = bench.scratch / "folder-src"
    _folder_tree(src, count)
    archive = shutil.make_archive(str(bench.scratch / "folder"), "zip", src)
    ops: dict[str, Callable[[Path], object]] = {
        "cp -r": lambda dest: subprocess.run(["cp", "-r", str(src / "pkg"), str(dest)], check=True),
        "mv": lambda dest: subprocess.run(
            ["mv", str(bench.scratch / "folder-mv" / "pkg"), str(dest)], check=True
        ),
        "unzip": lambda dest: zipfile.ZipFile(archive).extractall(dest),
    }
    if shutil.which("git"):
        ops["git clone"] = lambda dest: _git_clone(src, dest)
    store = open_store(bench.config("folder-probe"))
    for name, op in ops.items():
        per_file: list[float] = []
        staged: list[float] = []
        bulk_same: list[float] = []
        for run in range(max(1, bench.runs // 2)):
            if name == "mv":
                shutil.rmtree(bench.scratch / "folder-mv", ignore_errors=True)
                shutil.copytree(src / "pkg", bench.scratch / "folder-mv" / "pkg")
            with watching_session(bench, "Folder", f"folder-{name}-{run}") as s:
                assert s.work_path is not None
                sent: list[str] = []
                s.store.upload_file = _counting(s.store.upload_file, sent)  # type: ignore[method-assign,assignment]
                op(s.work_path)
                t_exit = time.monotonic()
                made = [p for p in s.work_path.rglob("*") if p.is_file()]
                wait_until(partial(_drained, s, len(made)), timeout=600, step=0.02)
                staged.append(time.monotonic() - t_exit)
                s.flush(60)
                per_file.append(len(sent) / len(made))
                # The same files (a clone's .git too) uploaded in bulk, as the yardstick.
                items = [
                    Upload(rel=p.name, key=f"bulk-{name}-{run}/{i}", src=p)
                    for i, p in enumerate(made)
                ]
                bulk_same.append(timed(partial(Transfers(store, 10).upload, items)))
        what = f"{len(made)} files" if len(made) != count else "the same files"
        bench.add(
            table,
            f"{name}: tool exit to all staged",
            median(staged),
            f"{median(staged) / median(bulk_same):.2f} x a bulk upload of {what}; "
            f"{median(per_file):.2f} uploads per file",
        )
    store.close()


# ----------------------------------------------------------------------------- main


def print_tables(rows: dict[str, list[tuple[str, float, str]]], runs: int) -> None:
    """Markdown tables."""
    print(f"\nMedians of {runs} runs (seconds unless stated). Machine: {os.cpu_count()} cores.\n")
    for table, items in rows.items():
        print(f"### {table}\n")
        print("| measurement | value | ratio |")
        print("|---|---:|---|")
        for label, value, note in items:
            print(f"| {label} | {value:.3f} | {note} |")
        print()


def main() -> None:
    """Run the selected benchmark groups and print their tables."""
    from agent.config import LogConfig
    from agent.log import configure_logging

    configure_logging(LogConfig(console_level="warning"), None)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default="core,stream,resume,folder")
    parser.add_argument(
        "--link",
        default="loopback,office",
        help="the core group's links: loopback, office (15 ms each way, 100 Mbit/s), or both",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(str(n) for n in SIZES),
        help="stage sizes of the size group (files, comma-separated)",
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="size group: cProfile text files here"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep the server's data and scratch here, and reuse them next time (the size "
        "group then skips seeding a stage that is already there)",
    )
    args = parser.parse_args()
    links = tuple(args.link.split(","))
    if not links or any(link not in LINKS for link in links):
        parser.error(f"--link takes a comma-separated subset of {', '.join(LINKS)}")
    sizes = tuple(int(n) for n in args.sizes.split(","))
    groups: dict[str, Callable[[Bench], None]] = {
        "core": bench_core,
        "stream": bench_stream,
        "resume": bench_resume,
        "folder": bench_folder,
        "history": bench_history,
        "size": partial(bench_size, sizes=sizes, profile=args.profile),
    }
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="pdagent-bench-"))
    try:
        with SeaweedServer(scratch / "seaweed") as server:
            with contextlib.suppress(Exception):  # kept from an earlier run
                server.create_bucket(BUCKET)
            bench = Bench(server, scratch, args.runs, links)  # type: ignore[arg-type]
            for name in args.only.split(","):
                started = time.monotonic()
                groups[name](bench)
                print(f"[{name} done in {time.monotonic() - started:.0f}s]", file=sys.stderr)
                print_tables({k: v for k, v in bench.rows.items() if k.startswith(name)}, args.runs)
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    _ = threading  # threads of the agent stop with its sessions


if __name__ == "__main__":
    main()
