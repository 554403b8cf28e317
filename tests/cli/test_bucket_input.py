"""Everything read from the bucket is untrusted input (issue 9), on SeaweedFS.

A co-worker with write access to the bucket can plant any lock body, manifest
or object. The CLI answers each with a documented exit code (never 70, the
internal error), prints nothing raw that could drive the terminal, and stops a
download at the size the manifest names.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.stage.keys import StageKeys
from agent.store.base import ObjectStore

Run = Callable[..., subprocess.CompletedProcess[str]]
KEYS = StageKeys("Bucket_1", "planning")


@pytest.fixture
def run(s3_run: Run) -> Run:
    """The CLI on the test's SeaweedFS prefix (the one ``s3_store`` uses)."""
    return s3_run


def _lock(**fields: object) -> bytes:
    body: dict[str, object] = {
        "state": "held",
        "user": "bob",
        "machine": "ws-7",
        "since": "2026-01-01T08:00:00",
        "expires": "2099-01-01T08:00:00",
        "heartbeat_at": "2026-01-01T08:00:00",
    }
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def test_naive_lock_dates_are_read_as_utc(run: Run, s3_store: ObjectStore) -> None:
    """Dates without a timezone: lock show and open answer (UTC), unlock --force is exit 0."""
    s3_store.put_bytes(KEYS.lock, _lock())
    shown = run("lock", "show", "Bucket_1", "--stage", "planning")
    assert 0 == shown.returncode, shown.stderr
    assert "held by bob on ws-7" in shown.stdout
    assert "since 2026-01-01 08:00:00 UTC" in shown.stdout
    denied = run("open", "Bucket_1", "--user", "alice", "--stage", "planning")
    assert 5 == denied.returncode, denied.stderr
    unlocked = run("lock", "unlock", "Bucket_1", "--stage", "planning", "--force", "--json")
    assert 0 == unlocked.returncode, unlocked.stderr
    assert "released" == json.loads(unlocked.stdout)["lock"]["body"]["state"]


def test_broken_by_without_broken_at_is_shown(run: Run, s3_store: ObjectStore) -> None:
    """A released lock naming who broke it but not when: shown, exit 0."""
    s3_store.put_bytes(KEYS.lock, _lock(state="released", broken_by="op@host"))
    shown = run("lock", "show", "Bucket_1", "--stage", "planning")
    assert 0 == shown.returncode, shown.stderr
    assert "broken by op@host at an unknown time" in shown.stdout


def test_control_characters_from_the_bucket_are_printed_escaped(
    run: Run, s3_store: ObjectStore
) -> None:
    """Escape sequences in user and machine never reach the terminal raw, nor forge lines."""
    s3_store.put_bytes(
        KEYS.lock, _lock(user="\x1b[2J\x1b[Hbob", machine="ws\nerror: forged line\r")
    )
    for args in (
        ("lock", "show", "Bucket_1", "--stage", "planning"),
        ("open", "Bucket_1", "--user", "alice", "--stage", "planning"),
    ):
        result = run(*args)
        out = result.stdout + result.stderr
        assert "\x1b" not in out
        assert "\r" not in out
        assert "\\x1b[2J" in out
        assert not any(line.startswith("error: forged") for line in out.splitlines())
        assert result.returncode in (0, 5), out


def test_unlock_force_on_a_corrupt_lock_succeeds(run: Run, s3_store: ObjectStore) -> None:
    """A lock body that is not a lock: show says corrupt (exit 4), unlock --force is exit 0."""
    s3_store.put_bytes(KEYS.lock, b"\xff\xfenot json at all")
    assert 4 == run("lock", "show", "Bucket_1", "--stage", "planning").returncode
    unlocked = run("lock", "unlock", "Bucket_1", "--stage", "planning", "--force")
    assert 0 == unlocked.returncode, unlocked.stderr
    shown = run("lock", "show", "Bucket_1", "--stage", "planning", "--json")
    assert "released" == json.loads(shown.stdout)["lock"]["body"]["state"]


def _manifest(files: dict[str, tuple[int, str]]) -> bytes:
    entries = {rel: {"size": n, "sha256": sha, "etag": "x"} for rel, (n, sha) in files.items()}
    return json.dumps({"version": 1, "files": entries}).encode()


def test_an_object_larger_than_the_manifest_says_is_not_downloaded_whole(
    run: Run, s3_store: ObjectStore, tmp_path: Path
) -> None:
    """The download stops at the manifest's size: exit 7, nothing left in the folder."""
    s3_store.put_bytes(KEYS.committed("big.bin"), os.urandom(4 * 1024 * 1024))
    s3_store.put_bytes(KEYS.manifest, _manifest({"big.bin": (10, "0" * 64)}))
    result = run("open", "Bucket_1", "--user", "alice", "--stage", "planning")
    assert 7 == result.returncode, result.stderr
    assert "larger than the manifest says" in result.stderr
    leftovers = [p for p in (tmp_path / "base").rglob("*big.bin*") if p.is_file()]
    assert [] == leftovers


def test_a_missing_object_is_exit_7(run: Run, s3_store: ObjectStore) -> None:
    """A manifest naming an object that is not there: the store's problem (7), not local (11)."""
    s3_store.put_bytes(KEYS.manifest, _manifest({"gone.txt": (3, "0" * 64)}))
    result = run("open", "Bucket_1", "--user", "alice", "--stage", "planning")
    assert 7 == result.returncode, result.stderr
    assert "gone.txt" in result.stderr


def _intent(**fields: object) -> bytes:
    """A commit intent as a co-worker could craft it (unfinished: the next opener acts)."""
    sha = "a" * 64
    body: dict[str, object] = {
        "state": "applying",
        "session_id": "20260101T000000-abcdef01",
        "commit_id": "c" * 32,
        "write_id": "w" * 32,
        "user": "mallory",
        "machine": "m",
        "created_at": "2026-01-01T08:00:00Z",
        "base_manifest_etag": None,
        "copies": {"a.txt": {"size": 1, "sha256": sha, "etag": "e" * 32}},
        "deletes": [],
        "source": "objects",
    }
    body.update(fields)
    return json.dumps(body).encode()


CRAFTED_INTENTS = {
    "history key on another stage's lock": _intent(history_key="Bucket_1/detail.lock.json"),
    "history key in another project": _intent(
        history_key="Other_1/.history/planning/0000000001~20260101T080000Z~"
        + "c" * 32
        + "~1~0~0~1~mallory.json"
    ),
    "a path that climbs out": _intent(
        copies={"../../escape.txt": {"size": 1, "sha256": "a" * 64, "etag": "e"}}
    ),
    "a delete that climbs out": _intent(deletes=["../detail/plan.dwg"]),
    "a manifest with a climbing path": _intent(
        manifest={
            "version": 2,
            "commit_id": "c" * 32,
            "files": {"../x": {"size": 1, "sha256": "a" * 64, "etag": "e"}},
        }
    ),
    "a session id that is a path": _intent(session_id="../../other"),
}

SMALL_LIMIT = {"AGENT_STORE__MAX_MANIFEST_BYTES": "4096"}
"""The size limit of an object read whole, small enough that an oversized intent is cheap."""

UNPARSEABLE_INTENTS = {
    "not JSON": b"\xff\xfe{not json at all",
    "a JSON list": b'[{"state": "applying"}]',
    "JSON of the wrong shape": json.dumps({"state": "applying", "copies": 7}).encode(),
    "over the size limit": _intent(deletes=[f"d/{i:05d}.txt" for i in range(600)]),
}
"""Intent bodies that are no commit intent at all: refused as a crafted one is (with
``SMALL_LIMIT``: the last is over it, so it is not even read)."""


@pytest.mark.parametrize("case", sorted({**CRAFTED_INTENTS, **UNPARSEABLE_INTENTS}))
def test_a_crafted_commit_intent_is_refused_and_never_executed(
    run: Run, s3_store: ObjectStore, case: str
) -> None:
    """An intent naming keys outside its stage, unsafe paths or impossible ids, or one that
    does not parse at all: the next open refuses it (exit 18, saying why), writes nothing
    it names, and leaves it in place."""
    body = {**CRAFTED_INTENTS, **UNPARSEABLE_INTENTS}[case]
    other_lock = _lock(user="carol")
    s3_store.put_bytes("Bucket_1/detail.lock.json", other_lock)
    s3_store.put_bytes(KEYS.intent, body)
    before = sorted(o.key for o in s3_store.list(""))
    result = run("open", "Bucket_1", "--user", "alice", "--stage", "planning", more_env=SMALL_LIMIT)
    assert 18 == result.returncode, result.stderr
    assert "is refused" in result.stderr
    assert other_lock == s3_store.get("Bucket_1/detail.lock.json").body
    assert body == s3_store.get(KEYS.intent).body
    after = sorted(o.key for o in s3_store.list(""))
    assert [k for k in after if k not in before] == [KEYS.lock], "it wrote more than the lock"
    assert "released" == json.loads(s3_store.get(KEYS.lock).body)["state"]


@pytest.mark.parametrize("source", ["staging", "objects"])
def test_an_intent_naming_another_sessions_id_deletes_none_of_its_staged_files(
    run: Run, s3_store: ObjectStore, source: str
) -> None:
    """An intent of the right shape that names another session (whose staging an older
    agent left under ``.sessions/``): whether the next open rolls it forward or refuses
    it, that session's staged files are all still there, and so is every object in
    ``.objects/`` (the roll-forward used to delete the named session's staging prefix)."""
    other = "20260101T000000-0123abcd"
    staged = {f"Bucket_1/.sessions/{other}/a.txt": b"x", f"Bucket_1/.sessions/{other}/b.txt": b"y"}
    for key, body in staged.items():
        s3_store.put_bytes(key, body)
    sha = hashlib.sha256(b"x").hexdigest()
    s3_store.put_bytes(f"Bucket_1/.objects/{sha}", b"x")
    etag = s3_store.head(f"Bucket_1/.sessions/{other}/a.txt").etag
    copies = {"a.txt": {"size": 1, "sha256": sha, "etag": etag}}
    s3_store.put_bytes(KEYS.intent, _intent(session_id=other, source=source, copies=copies))
    result = run("open", "Bucket_1", "--user", "alice", "--stage", "planning")
    if result.returncode == 0:
        assert 0 == run("abort").returncode
    assert result.returncode in (0, 13, 18), result.stderr
    left = {o.key for o in s3_store.list("Bucket_1/")}
    assert set(staged) <= left, "staged files of another session were deleted"
    assert f"Bucket_1/.objects/{sha}" in left


def _lock_show(
    run: Run, *more: str, more_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run("lock", "show", "Bucket_1", "--stage", "planning", *more, more_env=more_env)


def test_lock_show_names_a_refused_commit_intent_and_exits_18(
    run: Run, s3_store: ObjectStore
) -> None:
    """A crafted intent (its history key names another stage's lock): `lock show` prints
    the lock and says the intent is refused and why, in text and --json, exit 18; the
    intent is left in place."""
    crafted = CRAFTED_INTENTS["history key on another stage's lock"]
    s3_store.put_bytes(KEYS.lock, _lock())
    s3_store.put_bytes(KEYS.intent, crafted)
    shown = _lock_show(run)
    assert 18 == shown.returncode, shown.stderr
    assert "held by bob on ws-7" in shown.stdout
    assert "commit intent: REFUSED" in shown.stdout
    assert "its history key is not this stage's entry" in shown.stdout
    as_json = _lock_show(run, "--json")
    assert 18 == as_json.returncode, as_json.stderr
    intent = json.loads(as_json.stdout)["intent"]
    assert "refused" == intent["state"]
    assert "its history key is not this stage's entry" in intent["problem"]
    assert crafted == s3_store.get(KEYS.intent).body


@pytest.mark.parametrize("case", sorted(UNPARSEABLE_INTENTS))
def test_lock_show_reports_an_unparseable_commit_intent_as_refused_and_exits_18(
    run: Run, s3_store: ObjectStore, case: str
) -> None:
    """An intent that is no commit intent at all (not JSON, a list, the wrong fields, over
    the size limit): `lock show` reports it refused, as a crafted one, in text and --json,
    exit 18 (not 7, a store error), and it is left in place."""
    body = UNPARSEABLE_INTENTS[case]
    s3_store.put_bytes(KEYS.lock, _lock())
    s3_store.put_bytes(KEYS.intent, body)
    shown = _lock_show(run, more_env=SMALL_LIMIT)
    assert 18 == shown.returncode, shown.stderr
    assert "held by bob on ws-7" in shown.stdout
    [line] = [x for x in shown.stdout.splitlines() if x.startswith("commit intent: REFUSED: ")]
    as_json = _lock_show(run, "--json", more_env=SMALL_LIMIT)
    assert 18 == as_json.returncode, as_json.stderr
    intent = json.loads(as_json.stdout)["intent"]
    assert "refused" == intent["state"]
    assert intent["problem"]
    assert line.startswith(f"commit intent: REFUSED: {intent['problem']}")
    assert body == s3_store.get(KEYS.intent).body


def test_lock_show_escapes_the_problem_of_a_refused_intent(run: Run, s3_store: ObjectStore) -> None:
    """A path with control characters in a refused intent: shown escaped, no forged line."""
    s3_store.put_bytes(
        KEYS.intent,
        _intent(deletes=["../\x1b[2J\nerror: forged"]),
    )
    shown = _lock_show(run)
    assert 18 == shown.returncode, shown.stderr
    assert "\x1b" not in shown.stdout
    assert "\\x1b[2J" in shown.stdout
    assert not any(line.startswith("error: forged") for line in shown.stdout.splitlines())


@pytest.mark.parametrize(
    ("body", "state"),
    [(None, "none"), (_intent(), "unfinished"), (_intent(state="done"), "finished")],
)
def test_lock_show_reports_an_acceptable_commit_intent_and_exits_0(
    run: Run, s3_store: ObjectStore, body: bytes | None, state: str
) -> None:
    """No intent, a finished one, or an unfinished one the next holder would finish: named
    in text and --json, exit 0 (even with no lock object at all)."""
    if body is not None:
        s3_store.put_bytes(KEYS.intent, body)
    shown = _lock_show(run)
    assert 0 == shown.returncode, shown.stderr
    assert f"commit intent: {state}" in shown.stdout
    as_json = _lock_show(run, "--json")
    assert 0 == as_json.returncode, as_json.stderr
    assert state == json.loads(as_json.stdout)["intent"]["state"]


def test_doctor_with_a_stage_fails_on_a_refused_commit_intent(
    run: Run, s3_store: ObjectStore
) -> None:
    """`doctor --stage`: the check "commit intent" names the refused intent and why, and
    fails (exit 18); without a stage there is no such check."""
    s3_store.put_bytes(KEYS.intent, CRAFTED_INTENTS["history key on another stage's lock"])
    checked = run("doctor", "Bucket_1", "--stage", "planning", "--json")
    assert 18 == checked.returncode, checked.stderr
    answer = json.loads(checked.stdout)
    assert answer["ok"] is False
    [check] = [c for c in answer["checks"] if c["name"] == "commit intent"]
    assert check["ok"] is False
    assert check["found"].startswith("refused: its history key is not this stage's entry")
    text = run("doctor", "Bucket_1", "--stage", "planning")
    assert 18 == text.returncode, text.stderr
    [line] = [x for x in text.stdout.splitlines() if x.startswith("[FAIL] commit intent:")]
    assert f"{KEYS.intent} REFUSED: its history key is not this stage's entry" in line
    plain = run("doctor", "--json")
    assert "commit intent" not in [c["name"] for c in json.loads(plain.stdout)["checks"]]


@pytest.mark.parametrize("case", sorted(UNPARSEABLE_INTENTS))
def test_doctor_with_a_stage_reports_an_unparseable_commit_intent_as_refused(
    run: Run, s3_store: ObjectStore, case: str
) -> None:
    """`doctor --stage` on an intent that is no commit intent at all: the check "commit
    intent" fails as for a crafted one (refused, exit 18), not as a store error."""
    s3_store.put_bytes(KEYS.intent, UNPARSEABLE_INTENTS[case])
    checked = run("doctor", "Bucket_1", "--stage", "planning", "--json", more_env=SMALL_LIMIT)
    assert 18 == checked.returncode, checked.stderr
    [check] = [c for c in json.loads(checked.stdout)["checks"] if c["name"] == "commit intent"]
    assert check["ok"] is False
    assert check["found"].startswith("refused: ")
    text = run("doctor", "Bucket_1", "--stage", "planning", more_env=SMALL_LIMIT)
    assert 18 == text.returncode, text.stderr
    [line] = [x for x in text.stdout.splitlines() if x.startswith("[FAIL] commit intent:")]
    assert f"{KEYS.intent} REFUSED: " in line


def test_doctor_with_a_stage_passes_without_a_commit_intent(
    run: Run, s3_store: ObjectStore
) -> None:
    """`doctor --stage` on a stage no commit has touched: "commit intent" found none, ok."""
    checked = run("doctor", "Bucket_1", "--stage", "planning", "--json")
    answer = json.loads(checked.stdout)
    [check] = [c for c in answer["checks"] if c["name"] == "commit intent"]
    assert check == {**check, "ok": True, "found": "none"}
    assert 0 == checked.returncode, checked.stdout


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (CRAFTED_INTENTS["history key on another stage's lock"], "its history key is not"),
        (UNPARSEABLE_INTENTS["not JSON"], "it does not parse as a commit intent"),
    ],
    ids=["crafted", "unparseable"],
)
def test_status_shows_a_close_refused_for_a_crafted_intent(
    run: Run, s3_store: ObjectStore, body: bytes, problem: str
) -> None:
    """An intent crafted while a session is open (a wrong one, or one that does not parse):
    close refuses it (exit 18) and `agent status` then shows the refusal as a problem of
    the session, text and --json."""
    opened = run("open", "Bucket_1", "--user", "alice", "--stage", "planning")
    assert 0 == opened.returncode, opened.stderr
    try:
        s3_store.put_bytes(KEYS.intent, body)
        closed = run("close")
        assert 18 == closed.returncode, closed.stderr
        status = run("status")
        assert 0 == status.returncode, status.stderr
        assert "PROBLEM: close refused: the commit intent" in status.stdout
        assert f"is refused: {problem}" in status.stdout
        [row] = json.loads(run("status", "--json").stdout)["sessions"]
        assert "is refused" in row["intent_refused"]
        assert "close refused: the commit intent" in row["error"]
    finally:
        s3_store.delete_many([KEYS.intent])
        run("abort")
