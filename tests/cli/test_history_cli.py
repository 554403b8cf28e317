"""``agent history`` / ``show`` / ``restore`` as a user runs them (issue 11), embedded store."""

from __future__ import annotations

import json
from pathlib import Path

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

    restored = run("restore", P, "plan.dwg", "--stage", STAGE, "--commit", "#1", "--json")
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
