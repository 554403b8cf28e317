"""Fuzz: hostile lock bodies, manifests and key names on SeaweedFS (issue 9); commit
intents, history keys and entries and kept versions (issue 19).

``open``, ``lock show``, ``lock unlock --force`` and ``recover`` run against
random bucket content; so do ``history``, ``history --path``, ``show`` and
``history prune --dry-run`` against random intents (of the agent's shape with
one to three crafted fields), history keys and entries, and ``.objects/`` bodies.
Every run ends with a documented exit code (never 70, the internal error), and
no file named by the bucket lands outside the working folder. Seeded and
bounded in examples and in time. The commands run in-process through
``agent.cli.app.main`` (a subprocess per command would cost a second each); an
``open`` that succeeds starts a real background agent, which ``abort`` ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from agent.cli.app import main
from agent.stage.keys import CommitInfo, StageKeys
from agent.store.base import ObjectStore

DOCUMENTED = {0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22}
KEYS = StageKeys("Fuzz_1", "planning")
MARK = "fzq"
BUDGET_SECONDS = 90.0
# Examples per fuzz test: a seeded share in the default run, all of them under -m stress
# (the same seed: the default examples are the first of the stress run's).
EXAMPLES = pytest.mark.parametrize(
    "examples",
    [pytest.param(12, id="default"), pytest.param(40, marks=pytest.mark.stress, id="stress")],
)

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


@EXAMPLES
def test_hostile_bucket_content_never_crashes_the_cli(
    s3_env: dict[str, str],
    s3_store: ObjectStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    examples: int,
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
        max_examples=examples,
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


# --- intents, history keys and entries, kept versions (issue 19) -----------------------

_SHAS = [hashlib.sha256(b"v1").hexdigest(), "0" * 64, "f" * 64]
_hex32 = st.sampled_from(["c" * 32, "c" * 32, "0" * 32, "C" * 32, "../" + "c" * 29, ""])
_stamps = st.sampled_from(
    [
        "20260101T080000Z",
        "20260101T080000Z",
        "20261350T250000Z",
        "00000000T000000Z",
        "99991231T235959Z",
        "x",
    ]
)
_counts = st.one_of(st.integers(min_value=0, max_value=10**12).map(str), _texts)
_history_names = st.one_of(
    _texts,
    st.builds(
        lambda seq, when, cid, a, c, r, b, user: f"{seq}~{when}~{cid}~{a}~{c}~{r}~{b}~{user}.json",
        st.one_of(st.sampled_from([1, 1, 2, 0, 10**10 - 1]).map(lambda n: f"{n:010d}"), _texts),
        _stamps,
        _hex32,
        _counts,
        _counts,
        _counts,
        _counts,
        st.one_of(st.sampled_from(["alice", "bob"]), _texts),
    ),
)
_version_entries = st.fixed_dictionaries(
    {
        "size": st.one_of(st.integers(min_value=-1, max_value=2**40), _texts),
        "sha256": st.one_of(st.sampled_from(_SHAS), _texts),
        "etag": st.one_of(st.just("e" * 32), _texts),
    }
)
_history_bodies = st.one_of(
    st.binary(max_size=64),
    st.fixed_dictionaries(
        {"files": st.dictionaries(st.one_of(st.just("plan.dwg"), _names), _version_entries,
                                  max_size=3)},
        optional={"version": st.sampled_from([1, 2, -1]), "commit_id": _hex32,
                  "seq": st.integers(min_value=-1, max_value=10)},
    ).map(lambda d: json.dumps(d).encode()),
)  # fmt: skip
_copies = st.dictionaries(
    st.one_of(st.just("a.txt"), _names, st.sampled_from(["../x", "/abs", "a/../../b"])),
    st.one_of(
        st.fixed_dictionaries(
            {"size": st.just(2), "sha256": st.sampled_from(_SHAS), "etag": st.just("e" * 32)}
        ),
        _version_entries,
    ),
    max_size=3,
)
_good_entry = st.fixed_dictionaries(
    {"size": st.just(2), "sha256": st.sampled_from(_SHAS), "etag": st.just("e" * 32)}
)
_good_paths = st.sampled_from(["a.txt", "plan.dwg", "docs/b.txt"])
# An intent of the shape this agent writes ...
_good_intent: dict[str, st.SearchStrategy[Any]] = {
    "state": st.sampled_from(["applying", "applying", "done"]),
    "session_id": st.just("20260101T000000-abcdef01"),
    "commit_id": st.just("c" * 32),
    "write_id": st.just("w" * 32),
    "user": st.just("mallory"),
    "machine": st.just("m"),
    "created_at": st.just("2026-01-01T08:00:00Z"),
    "base_manifest_etag": st.none(),
    "copies": st.dictionaries(_good_paths, _good_entry, max_size=2),
    "deletes": st.lists(_good_paths, max_size=1),
    "source": st.sampled_from(["objects", "staging"]),
}
# ... with one to three fields a co-worker crafted.
_crafted: dict[str, st.SearchStrategy[Any]] = {
    "session_id": st.one_of(_texts, st.sampled_from(["../../other", "20260101T000000-otheroth"])),
    "commit_id": _hex32,
    "user": _texts,
    "base_manifest_etag": st.one_of(_texts, st.just("0")),
    "copies": _copies,
    "deletes": st.lists(
        st.one_of(_names, st.sampled_from(["../detail/x", "", "/abs", ".."])), max_size=3
    ),
    "keeps": _copies,
    "history_key": st.one_of(
        st.sampled_from(
            ["Fuzz_1/detail.lock.json", "Other_1/.history/planning/x.json", "Fuzz_1/x"]
        ),
        _history_names.map(lambda n: KEYS.history_prefix + n),
    ),
    "manifest": st.fixed_dictionaries(
        {"version": st.just(2), "commit_id": _hex32, "files": _copies}
    ),
}
_intents = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.tuples(
        st.fixed_dictionaries(_good_intent),
        st.lists(st.sampled_from(sorted(_crafted)), min_size=1, max_size=3, unique=True).flatmap(
            lambda names: st.fixed_dictionaries({n: _crafted[n] for n in names})
        ),
    ).map(lambda pair: json.dumps({**pair[0], **pair[1]}).encode()),
)
_kept = st.dictionaries(st.sampled_from(_SHAS), st.binary(max_size=64), max_size=3)
# Keys nothing in the bucket may make the agent write or delete.
_SENTINELS = {"Fuzz_1/detail.lock.json": b"{}", "Other_1/planning/x.txt": b"x"}
_ALLOWED = ("Fuzz_1/planning/", "Fuzz_1/planning.", "Fuzz_1/.objects/", KEYS.history_prefix)


def _peak_rss() -> int:
    """This process's peak resident memory so far (bytes, ``VmHWM``), 0 where unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@EXAMPLES
def test_hostile_intents_history_and_kept_versions_never_crash_the_cli(
    s3_env: dict[str, str],
    s3_store: ObjectStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    examples: int,
) -> None:
    """Random commit intents, history keys and entries, kept versions in ``.objects/``:
    ``open`` (and ``abort``), ``history``, ``history --path``, ``show``, ``history prune
    --dry-run`` and ``recover`` end with documented exits, write nothing outside the
    working folder, write or delete no key outside the stage (another stage's lock,
    another project), within a time budget and 300 MiB more memory."""
    base = tmp_path / "base"
    work_root = base / ".app_temp" / "plant_design"
    for name in ("AGENT_STORE__URL", "AGENT_STORE__ENDPOINT_URL", "AGENT_STORE__REGION"):
        if name in s3_env:
            monkeypatch.setenv(name, s3_env[name])
    monkeypatch.setenv("AGENT_PATHS__BASE_DIR", str(base))
    monkeypatch.setenv("AGENT_RETRY__ATTEMPTS", "2")
    monkeypatch.setenv("AGENT_RETRY__INITIAL_BACKOFF", "0.01")
    monkeypatch.setenv("AGENT_RETRY__MAX_BACKOFF", "0.02")
    for key, body in _SENTINELS.items():
        s3_store.put_bytes(key, body)
    started = time.monotonic()
    peak_before = _peak_rss()
    runs: list[int] = []

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=False,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @seed(20261205)
    @given(intent=_intents, history=st.dictionaries(_history_names, _history_bodies, max_size=4),
           kept=_kept, manifest=_manifests)  # fmt: skip
    def one(
        intent: bytes | None,
        history: dict[str, bytes],
        kept: dict[str, bytes],
        manifest: bytes | None,
    ) -> None:
        if time.monotonic() - started > BUDGET_SECONDS:
            return  # bounded in time: the remaining examples pass untried
        runs.append(1)
        _put(store, KEYS.intent, intent)
        _put(store, KEYS.manifest, manifest)
        _put(store, KEYS.lock, None)
        for old in store.list(KEYS.history_prefix):
            store.delete(old.key)
        # One good entry, so that `show #1` reads a kept version (random bytes, maybe).
        good = CommitInfo(1, "c" * 32, datetime(2026, 1, 1, tzinfo=UTC), "alice", 1, 0, 0, 2)
        store.put_bytes(
            good.key_in(KEYS),
            json.dumps(
                {"version": 2, "commit_id": "c" * 32, "seq": 1,
                 "files": {"plan.dwg": {"size": 2, "sha256": _SHAS[0], "etag": "e" * 32}}}
            ).encode(),
        )  # fmt: skip
        for name, body in history.items():
            with contextlib.suppress(Exception):  # a key S3 refuses is not our test
                store.put_bytes(KEYS.history_prefix + name, body)
        for sha, body in kept.items():
            store.put_bytes(f"Fuzz_1/.objects/{sha}", body)
        before = {o.key for o in store.list("")}
        try:
            out = tmp_path / "shown" / "plan.dwg"
            _cli("history", "list", "Fuzz_1", "--stage", "planning")
            _cli("history", "list", "Fuzz_1", "--stage", "planning", "--path", "plan.dwg")
            _cli("show", "Fuzz_1", "--stage", "planning", "--commit", "#1", "--path", "plan.dwg",
                 "--output", str(out))  # fmt: skip
            opened = _cli("open", "Fuzz_1", "--user", "fuzzer", "--stage", "planning")
            if opened == 0:
                assert 0 == _cli("abort")
            if opened == 18:  # refused: left in place, never executed
                assert intent == store.get(KEYS.intent).body
            _cli("history", "prune", "Fuzz_1", "--dry-run")
            _cli("recover")
            assert [] == _files_outside(tmp_path, work_root)
            for key, body in _SENTINELS.items():
                assert body == store.get(key).body, f"{key} was overwritten"
            after = {o.key for o in store.list("")}
            outside = sorted(k for k in after - before if not k.startswith(_ALLOWED))
            assert [] == outside, f"written outside the stage: {outside}"
        finally:
            _cli("recover", "--discard", "--yes")
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(tmp_path / "shown", ignore_errors=True)

    store = s3_store
    one()
    assert len(runs) >= 5, "the time budget ran out before the fuzzer got going"
    grown = _peak_rss() - peak_before
    assert grown < 300 * 1024 * 1024, f"the peak grew by {grown / 2**20:.0f} MiB"
