"""Fuzz: hostile lock bodies, manifests and key names on SeaweedFS (issue 9).

``open``, ``lock show``, ``lock unlock --force`` and ``recover`` run against
random bucket content. Every run ends with a documented exit code (never 70,
the internal error), and no file named by the bucket lands outside the working
folder. Seeded and bounded in examples and in time. The commands
run in-process through ``agent.cli.main`` (a subprocess per command would cost
a second each); an ``open`` that succeeds starts a real background agent,
which ``abort`` ends.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from agent.cli import main
from agent.keys import StageKeys
from agent.store.base import ObjectStore

DOCUMENTED = {0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20}
KEYS = StageKeys("Fuzz_1", "planning")
MARK = "fzq"
BUDGET_SECONDS = 90.0

_PIECES = ["a", "b", "/", ".", "..", "\\", ":", "~$", " ", "\x00", "\x1b[2J", "\r", "\n", "\u202e"]
_texts = st.lists(st.sampled_from([*_PIECES, "\u00e9", "\u4e2d", MARK]), max_size=10).map("".join)
_dates = st.one_of(
    st.datetimes().map(lambda d: d.isoformat()),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.sampled_from(["", "yesterday", "2026-13-45T99:00:00", "0001-01-01T00:00:00Z"]),
    st.integers(min_value=-(2**63), max_value=2**63),
)
_names = st.builds(lambda t: MARK + t, _texts)
_lock_fields: dict[str, st.SearchStrategy[Any]] = {
    "state": st.sampled_from(["held", "released", "HELD", "", None]),
    "user": st.one_of(_texts, st.none(), st.integers()),
    "machine": st.one_of(_texts, st.none()),
    "since": _dates,
    "expires": _dates,
    "heartbeat_at": _dates,
    "session_id": st.one_of(_texts, st.none()),
    "pid": st.one_of(st.integers(), st.none(), _texts),
    "broken_by": st.one_of(_texts, st.none()),
    "broken_at": st.one_of(_dates, st.none()),
    "write_id": st.one_of(_texts, st.none()),
}
_naive = st.datetimes().map(lambda d: d.isoformat())
_released = st.fixed_dictionaries(
    {
        "state": st.just("released"),
        "user": _texts,
        "machine": _texts,
        "since": _naive,
        "expires": _naive,
        "heartbeat_at": _naive,
    },
    optional={k: v for k, v in _lock_fields.items() if k.startswith(("broken", "session"))},
)
_LOCK_KINDS: dict[str, st.SearchStrategy[bytes | None]] = {
    # no lock object: open gets as far as the manifest
    "absent": st.none(),
    # a free lock with hostile text in it: open goes on too
    "released": _released.map(lambda d: json.dumps(d).encode()),
    "bytes": st.binary(max_size=64),
    "fields": st.fixed_dictionaries({}, optional=_lock_fields).map(
        lambda d: json.dumps(d).encode()
    ),
}
_lock_bodies = st.sampled_from(["absent", "released", "released", "bytes", "fields"]).flatmap(
    lambda kind: _LOCK_KINDS[kind]
)
_entries = st.fixed_dictionaries(
    {},
    optional={
        "size": st.one_of(st.integers(min_value=-5, max_value=2**40), _texts),
        "sha256": st.one_of(st.just("0" * 64), _texts),
        "etag": _texts,
    },
)
_manifests = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.fixed_dictionaries(
        {"files": st.dictionaries(_names, _entries, max_size=4)},
        optional={"version": st.integers(), "session_id": _texts},
    ).map(lambda d: json.dumps(d).encode()),
)
_objects = st.dictionaries(
    st.builds(lambda t: MARK + t, _texts), st.binary(max_size=256), max_size=3
)


def _cli(*args: str) -> int:
    """Run one CLI command in this process; its exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        else:  # pragma: no cover - main always exits
            code = 0
    print(
        "FUZZ",
        args[:2],
        code,
        err.getvalue()[-300:].replace("\n", " | ") if code not in (0,) else "",
    )
    assert code in DOCUMENTED, f"agent {' '.join(args)} -> {code}: {err.getvalue()[-2000:]}"
    return code


def _put(store: ObjectStore, key: str, body: bytes | None) -> None:
    if body is None:
        store.delete(key)
    else:
        store.put_bytes(key, body)


def _files_outside(root: Path, allowed: Path) -> list[str]:
    """Files whose name carries the marker (named by the bucket) outside ``allowed``."""
    return [
        str(p) for p in root.rglob(f"*{MARK}*") if not p.is_dir() and not p.is_relative_to(allowed)
    ]


def test_hostile_bucket_content_never_crashes_the_cli(
    s3_env: dict[str, str],
    s3_store: ObjectStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Random lock bodies, manifests, objects and key names: documented exits, nothing escapes."""
    base = tmp_path / "base"
    work_root = base / ".app_temp" / "plant_design"
    for name in ("AGENT_STORE__URL", "AGENT_STORE__ENDPOINT_URL", "AGENT_STORE__REGION"):
        if name in s3_env:
            monkeypatch.setenv(name, s3_env[name])
    monkeypatch.setenv("AGENT_PATHS__BASE_DIR", str(base))
    monkeypatch.setenv("AGENT_RETRY__ATTEMPTS", "2")
    monkeypatch.setenv("AGENT_RETRY__INITIAL_BACKOFF", "0.01")
    monkeypatch.setenv("AGENT_RETRY__MAX_BACKOFF", "0.02")
    started = time.monotonic()
    runs: list[int] = []

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=False,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @seed(20261203)
    @given(lock=_lock_bodies, manifest=_manifests, objects=_objects)
    def one(lock: bytes | None, manifest: bytes | None, objects: dict[str, bytes]) -> None:
        if time.monotonic() - started > BUDGET_SECONDS:
            return  # bounded in time: the remaining examples pass untried
        runs.append(1)
        _put(store, KEYS.lock, lock)
        _put(store, KEYS.manifest, manifest)
        for rel, data in objects.items():
            with contextlib.suppress(Exception):  # a key S3 refuses is not our test
                store.put_bytes(KEYS.committed_prefix + rel, data)
        try:
            _cli("lock", "show", "Fuzz_1", "--stage", "planning")
            if _cli("open", "Fuzz_1", "--user", "fuzzer", "--stage", "planning") == 0:
                assert 0 == _cli("abort")
            _cli("recover")
            _cli("lock", "unlock", "Fuzz_1", "--stage", "planning", "--force")
            _cli("lock", "show", "Fuzz_1", "--stage", "planning")
            assert [] == _files_outside(tmp_path, work_root)
        finally:
            _cli("recover", "--discard", "--yes")
            shutil.rmtree(base, ignore_errors=True)

    store = s3_store
    one()
    assert len(runs) >= 5, "the time budget ran out before the fuzzer got going"


def test_markers_are_named_by_the_bucket_only(tmp_path: Path) -> None:
    """The check above finds marker files outside the working folder (it is not vacuous)."""
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / f"{MARK}in").write_text("")
    (tmp_path / f"{MARK}out").write_text("")
    assert [str(tmp_path / f"{MARK}out")] == _files_outside(tmp_path, tmp_path / "w")
