"""The CLI keeps its per-invocation state in ``click.Context.obj`` (issue 7, A5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import cli


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
