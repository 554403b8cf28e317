"""Bucket content cannot forge output (issue 19), as real ``agent`` processes on SeaweedFS.

A newline in a lock's ``user`` printed raw makes a second row in ``agent locks``;
an ESC or a bidi override (U+202E) in a history key printed raw in a warning
drives the terminal or reverses what it shows. Every text output of bucket
content goes through ``agent.text.printable``: such characters appear escaped.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

from agent.stage.keys import StageKeys
from agent.store.base import ObjectStore

Run = Callable[..., subprocess.CompletedProcess[str]]
KEYS = StageKeys("Forge_1", "planning")
RAW = ("\x1b", "\u202e", "\u2066", "\r")


@pytest.fixture
def run(s3_run: Run) -> Run:
    """The CLI on the test's SeaweedFS prefix (the one ``s3_store`` uses)."""
    return s3_run


def _lock(**fields: object) -> bytes:
    body: dict[str, object] = {
        "state": "held",
        "user": "bob",
        "machine": "ws-7",
        "since": "2026-01-01T08:00:00+00:00",
        "expires": "2099-01-01T08:00:00+00:00",
        "heartbeat_at": "2026-01-01T08:00:00+00:00",
    }
    body.update(fields)
    return json.dumps(body).encode()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("state", ["held", "released"])
def test_a_newline_in_a_locks_user_yields_exactly_one_row_in_agent_locks(
    run: Run, s3_store: ObjectStore, state: str
) -> None:
    """A user "bob<newline>Forge_2/...": one row for Forge_1, the forged row shown escaped."""
    forged = "bob\nForge_2/planning  free (last: eve on ws-1)\r"
    s3_store.put_bytes(KEYS.lock, _lock(state=state, user=forged, machine="ws\n\u202e7-sw"))
    result = run("locks")
    assert 0 == result.returncode, result.stderr
    rows = result.stdout.splitlines()
    assert 1 == len(rows), rows
    assert rows[0].startswith("Forge_1/planning")
    assert "\\x0aForge_2/planning" in rows[0]
    assert "\\u202e" in rows[0]
    assert not any(raw in result.stdout + result.stderr for raw in RAW)


@pytest.mark.timeout(120)
def test_an_esc_or_bidi_override_in_a_history_key_is_shown_escaped(
    run: Run, s3_store: ObjectStore
) -> None:
    """Junk history keys with ESC, U+202E, U+2066 and a newline: the warnings show them escaped."""
    prefix = "Forge_1/.history/planning/"
    for junk in ("\x1b[2Jcleared", "evil\u202eexe.txt", "x\u2066y", "two\nlines"):
        s3_store.put_bytes(prefix + junk, b"{}")
    result = run("history", "list", "Forge_1", "--stage", "planning")
    out = result.stdout + result.stderr
    assert result.returncode in (0, 7, 8), out
    assert not any(raw in out for raw in RAW), repr(out)
    assert "\\x1b[2Jcleared" in out
    assert "evil\\u202eexe.txt" in out
    assert not any(line.startswith("lines") for line in out.splitlines()), repr(out)
