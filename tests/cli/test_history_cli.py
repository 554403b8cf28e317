"""``agent history`` / ``show`` / ``restore`` as a user runs them (issue 11), embedded store."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from agent.store.local import LocalStore
from tests.cli.conftest import Run

P, STAGE = "Kraftwerk_1234567", "planning"


def _session(run: Run, user: str, files: dict[str, bytes]) -> None:
    opened = run("open", P, "--user", user, "--stage", STAGE, "--json")
    assert 0 == opened.returncode, opened.stderr
    work = Path(json.loads(opened.stdout)["path"])
    for rel, data in files.items():
        (work / rel).write_bytes(data)
    closed = run("close", "--json")
    assert 0 == closed.returncode, closed.stderr


def test_a_damaged_save_is_found_in_history_and_brought_back(run: Run, tmp_path: Path) -> None:
    """The README's story: bob commits a damaged drawing; history, show and restore undo it."""
    _session(run, "alice", {"plan.dwg": b"good drawing", "notes.txt": b"n"})
    _session(run, "bob", {"plan.dwg": b"DAMAGED"})

    listed = run("history", P, "--stage", STAGE, "--json")
    assert 0 == listed.returncode, listed.stderr
    commits = json.loads(listed.stdout)["commits"]
    assert [(c["seq"], c["user"], c["added"], c["changed"]) for c in commits] == [
        (1, "alice", 2, 0),
        (2, "bob", 0, 1),
    ]
    text = run("history", P, "--stage", STAGE).stdout
    assert "alice" in text and "bob" in text and "+2 ~0 -0" in text

    versions = run("history", P, "--stage", STAGE, "--path", "plan.dwg", "--json")
    assert [v["seq"] for v in json.loads(versions.stdout)["versions"]] == [1, 2]

    old = tmp_path / "old.dwg"
    shown = run("show", P, "--stage", STAGE, "--commit", commits[0]["commit_id"][:8],
                "--path", "plan.dwg", "--output", str(old))  # fmt: skip
    assert 0 == shown.returncode, shown.stderr
    assert old.read_bytes() == b"good drawing"

    restored = run("restore", P, "plan.dwg", "--stage", STAGE, "--commit", "#1", "--json", "--yes")
    assert 0 == restored.returncode, restored.stderr
    assert json.loads(restored.stdout)["written"] == ["plan.dwg"]

    after = json.loads(run("history", P, "--stage", STAGE, "--json").stdout)["commits"]
    assert [c["seq"] for c in after] == [1, 2, 3]  # a restore is a new commit
    again = tmp_path / "now.dwg"
    assert 0 == run("show", P, "--stage", STAGE, "--commit", "#3", "--path", "plan.dwg",
                    "--output", str(again)).returncode  # fmt: skip
    assert again.read_bytes() == b"good drawing"
    lock = json.loads(run("lock", "show", P, "--stage", STAGE, "--json").stdout)
    assert lock["lock"]["body"]["state"] == "released"


def test_an_unknown_commit_is_exit_21_with_a_hint(run: Run, tmp_path: Path) -> None:
    _session(run, "alice", {"plan.dwg": b"x"})
    out = run("show", P, "--stage", STAGE, "--commit", "ffffff", "--path", "plan.dwg",
              "--output", str(tmp_path / "x"), "--json")  # fmt: skip
    assert 21 == out.returncode
    error = json.loads(out.stdout)["error"]
    assert error["type"] == "VersionNotFoundError" and "agent history" in error["message"]
    assert not (tmp_path / "x").exists()


def test_prune_dry_run_reports_and_deletes_nothing(run: Run) -> None:
    _session(run, "alice", {"plan.dwg": b"1"})
    _session(run, "alice", {"plan.dwg": b"2"})
    out = run("history", "prune", P, "--dry-run", "--json")
    assert 0 == out.returncode, out.stderr
    plan = json.loads(out.stdout)
    assert (plan["dry_run"], plan["commits"], plan["kept_commits"]) == (True, [], 2)


def test_agent_locks_shows_who_works_on_what(run: Run) -> None:
    _session(run, "alice", {"plan.dwg": b"x"})
    opened = run("open", P, "--user", "bob", "--stage", "design", "--json")
    assert 0 == opened.returncode, opened.stderr
    out = run("locks", "--json")
    assert 0 == out.returncode, out.stderr
    rows = {(r["stage"], r["state"], r["user"]) for r in json.loads(out.stdout)["locks"]}
    assert rows == {("planning", "released", "alice"), ("design", "held", "bob")}
    text = run("locks", P).stdout
    assert f"{P}/design  held by bob" in text and f"{P}/planning  free" in text
    assert 0 == run("abort").returncode


def test_show_of_a_version_whose_object_is_larger_than_the_manifest_says_reads_no_more(
    run: Run, tmp_path: Path
) -> None:
    """A co-worker replaces a 4-byte version's object (and its plain key) with 20 MiB: `agent
    show` reads at most the manifest's size of each, writes nothing and says the version
    is not there (exit 21), instead of holding the whole object."""
    _session(run, "alice", {"plan.dwg": b"good"})
    _session(run, "bob", {"plan.dwg": b"newer"})
    store = LocalStore(tmp_path / "base" / "store")
    big = tmp_path / "big"
    big.write_bytes(os.urandom(20 * 1024 * 1024))
    store.upload_file(f"{P}/.objects/{hashlib.sha256(b'good').hexdigest()}", big)
    out = run("show", P, "--stage", STAGE, "--commit", "#1", "--path", "plan.dwg",
              "--output", str(tmp_path / "old.dwg"), "--json")  # fmt: skip
    assert 21 == out.returncode, out.stdout + out.stderr
    assert not (tmp_path / "old.dwg").exists()
    logs = "".join(p.read_text() for p in (tmp_path / "base" / "state" / "logs").glob("*.log"))
    assert "version_object_too_large" in logs, "the object was read whole, not cut at its size"


def test_a_history_key_with_an_impossible_date_is_skipped_not_a_crash(
    run: Run, tmp_path: Path
) -> None:
    """One junk history key of the right shape (month 13): `history` lists the real commits
    and warns, `show` and `close` still work (never exit 70)."""
    _session(run, "alice", {"plan.dwg": b"v1"})
    store = LocalStore(tmp_path / "base" / "store")
    junk = f"{P}/.history/{STAGE}/0000000009~20261350T250000Z~{'c' * 32}~1~0~0~1~mallory.json"
    store.put_bytes(junk, b"{}")
    listed = run("history", P, "--stage", STAGE, "--json")
    assert 0 == listed.returncode, listed.stderr
    assert [1] == [c["seq"] for c in json.loads(listed.stdout)["commits"]]
    _session(run, "bob", {"plan.dwg": b"v2"})
    shown = run("show", P, "--stage", STAGE, "--commit", "#1", "--path", "plan.dwg",
                "--output", str(tmp_path / "v1.dwg"))  # fmt: skip
    assert 0 == shown.returncode, shown.stderr
    assert b"v1" == (tmp_path / "v1.dwg").read_bytes()
    restored = run("restore", P, "plan.dwg", "--stage", STAGE, "--commit", "#1", "--json", "--yes")
    assert 0 == restored.returncode, restored.stderr
    assert ["plan.dwg"] == json.loads(restored.stdout)["written"]
    after = json.loads(run("history", P, "--stage", STAGE, "--json").stdout)["commits"]
    assert [1, 2, 3] == [c["seq"] for c in after]


def test_one_damaged_history_entry_hides_that_entry_not_the_history(
    run: Run, tmp_path: Path
) -> None:
    """A history entry whose body is not a manifest (a well-formed key): `history --path`
    lists the file's other versions and warns, `show` and `restore` of a good commit work;
    only that commit is "not there" (exit 21), never exit 7 or 70 for the whole history."""
    _session(run, "alice", {"plan.dwg": b"v1"})
    _session(run, "bob", {"plan.dwg": b"v2"})
    store = LocalStore(tmp_path / "base" / "store")
    [second] = [o.key for o in store.list(f"{P}/.history/{STAGE}/") if "/0000000002~" in o.key]
    store.put_bytes(second, b"\x1b[2J not a manifest")
    versions = run("history", P, "--stage", STAGE, "--path", "plan.dwg", "--json")
    assert 0 == versions.returncode, versions.stderr
    assert [1] == [v["seq"] for v in json.loads(versions.stdout)["versions"]]
    assert "\x1b" not in versions.stderr
    shown = run("show", P, "--stage", STAGE, "--commit", "#1", "--path", "plan.dwg",
                "--output", str(tmp_path / "v1.dwg"))  # fmt: skip
    assert 0 == shown.returncode, shown.stderr
    assert b"v1" == (tmp_path / "v1.dwg").read_bytes()
    damaged = run("show", P, "--stage", STAGE, "--commit", "#2", "--path", "plan.dwg",
                  "--output", str(tmp_path / "v2.dwg"))  # fmt: skip
    assert 21 == damaged.returncode, damaged.stderr
    assert "Traceback" not in damaged.stderr
    restored = run("restore", P, "plan.dwg", "--stage", STAGE, "--commit", "#1", "--json", "--yes")
    assert 0 == restored.returncode, restored.stderr
    assert ["plan.dwg"] == json.loads(restored.stdout)["written"]
