"""The CLI keeps its per-invocation state in ``click.Context.obj`` (issue 7, A5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli.app import cli


def test_json_mode_does_not_leak_into_the_next_invocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``status --json`` then ``status`` in one process: the second prints text."""
    monkeypatch.setenv("AGENT_PATHS__BASE_DIR", str(tmp_path / "base"))
    runner = CliRunner()
    first = runner.invoke(cli, ["status", "--json"])
    assert 0 == first.exit_code, first.output
    assert [] == json.loads(first.output)["sessions"]
    second = runner.invoke(cli, ["status"])
    assert 0 == second.exit_code, second.output
    assert "no open sessions" in second.output
    assert not second.output.lstrip().startswith("{")


def test_status_text_shows_a_newline_from_the_bucket_escaped_on_its_own_line() -> None:
    """A newline or ESC inside a value (a lock holder's name in an error, a repaired key)
    is shown escaped: it cannot forge a line of `agent status`."""
    from agent.cli.status import _status_lines

    row = {
        "projekt_id": "P",
        "stage": "s",
        "user": "alice",
        "state": "active",
        "phase": "active",
        "agent": "running",
        "path": "/w",
        "error": "lock lost: taken by bob\nPROBLEM: forged\x1b[2J",
        "stage_check": {"recopied": [], "removed": [], "objects_restored": [], "lost": ["a\nb"]},
    }
    lines = _status_lines(row)
    assert 1 == sum("PROBLEM: lock lost" in line for line in lines)
    assert not any(line.startswith("PROBLEM: forged") for line in lines)
    assert all("\n" not in line and "\x1b" not in line for line in lines)
    assert any("a\\x0ab" in line for line in lines)
