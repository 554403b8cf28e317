"""``agent status`` / ``recover``: what is open on this machine, and after a crash.

Registered on the ``agent`` group by ``agent.cli.app``.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from agent.cli.common import (
    _emit,
    _finished_text,
    _json_option,
    _obj,
    _progress,
    _session_cls,
    _store_label,
)
from agent.errors import AgentError
from agent.text import printable


def _status_lines(row: dict[str, Any]) -> list[str]:
    """The text of one session in ``agent status`` (every value shown escaped: a newline
    from the bucket, in a holder's name inside an error, cannot forge a line)."""
    row = {k: _printable_value(v) for k, v in row.items()}
    lines: list[str] = []
    lines.append(
        f"{row['projekt_id']}/{row['stage']}  user={row['user']}  "
        f"state={row.get('state', row['phase'])}"
        f"  agent={row['agent']}  pending={row.get('pending', '?')}  path={row['path']}"
    )
    if row.get("heartbeat_age_seconds") is not None:
        lines.append(f"  lock heartbeat {row['heartbeat_age_seconds']}s ago")
    if row.get("last_upload_at"):
        lines.append(f"  last upload {row['last_upload_at']} ({row.get('uploads', 0)} uploads)")
    if row["agent"] == "not answering":
        lines.append(
            f"  the background agent (pid {row['agent_pid']}) runs but does not answer: wait; "
            f"if it stays so, stop it (`kill {row['agent_pid']}`), then `agent recover --resume`"
        )
    elif row["agent"] != "running":
        lines.append("  the background agent is not running: `agent recover` resumes or discards")
    if row.get("error"):
        lines.append(f"  PROBLEM: {row['error']}")
    elif row.get("last_error"):
        lines.append(f"  last error: {row['last_error']}")
    if row.get("unsupported"):
        lines.append(
            "  not synchronised (name not storable; close refuses until renamed): "
            + ", ".join(row["unsupported"])
        )
    if row.get("not_synchronised"):
        lines.append(
            "  not synchronised (links and special files are never followed nor sent): "
            + ", ".join(_special_entry(entry) for entry in row["not_synchronised"])
        )
    if row.get("watch_mode") == "polling":
        why = row.get("watch_mode_reason") or "the system's file-watch limit is reached"
        lines.append(
            f"  watching by polling: {why} (Linux: raise fs.inotify.max_user_watches); "
            "saves are still seen, a little later"
        )
    elif row.get("watch_mode") == "stopped":
        lines.append("  PROBLEM: the folder is not being watched (retrying); close still scans")
    if row.get("waiting"):
        lines.append(
            "  waiting (held by another program or not readable; sent when free): "
            + ", ".join(row["waiting"])
        )
    lines += _stage_check_lines(row.get("stage_check"))
    return lines


def _special_entry(entry: dict[str, Any]) -> str:
    """``path (what it is[; close will delete committed path])`` of a status row."""
    path = entry.get("path")
    deletes = f"; close will delete committed {path}" if entry.get("deletes_committed") else ""
    return f"{path} ({entry.get('reason')}{deletes})"


def _printable_value(value: object) -> object:
    """``value`` with its strings escaped (``printable``), lists and dicts walked."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [_printable_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _printable_value(v) for k, v in value.items()}
    return value


def _stage_check_lines(check: object) -> list[str]:
    """What the lock holder's check of the stage's plain tree found (``agent.stage.repair``)."""
    if check == "running":
        return ["  checking the stage's files in the store against its manifest"]
    if not isinstance(check, dict):
        return []
    done = [
        f"{len(check[key])} {what}"
        for key, what in (
            ("recopied", "files copied again from .objects/"),
            ("removed", "stray keys removed"),
            ("objects_restored", "objects restored from the plain tree"),
        )
        if check.get(key)
    ]
    lines = [f"  stage repaired: {', '.join(done)}"] if done else []
    if check.get("lost"):
        lines.append(
            "  PROBLEM: content gone from the store (restore from `agent history`): "
            + ", ".join(check["lost"][:10])
        )
    if check.get("error"):
        lines.append(f"  the stage check stopped: {check['error']}")
    return lines


@click.command("status")
@_json_option
def status_cmd() -> None:
    """Sessions open on this machine: state, lock, pending changes, last upload, errors."""
    from agent.agentd.client import AgentClient
    from agent.errors import AgentUnreachableError
    from agent.platform import pid_alive
    from agent.session.records import SessionStore

    config = _obj().config
    rows: list[dict[str, Any]] = []
    for r in SessionStore(config.paths.state_dir).all():
        row: dict[str, Any] = {
            "session_id": r.session_id,
            "projekt_id": r.projekt_id,
            "stage": r.stage,
            "user": r.user,
            "machine": r.machine,
            "phase": r.phase,
            "path": str(r.work_path),
            "since": r.created_at.isoformat(),
            "agent_pid": r.agent_pid,
            "last_error": r.last_error,
        }
        try:
            row.update(AgentClient(r, config.paths).call("status"))
            row["agent"] = "running"
        except AgentUnreachableError as exc:
            alive = r.agent_pid is not None and pid_alive(r.agent_pid)
            row["agent"] = "not answering" if alive else "not running"
            row["agent_error"] = exc.format_message()
        except AgentError as exc:  # it answered, with an error: it runs, and says what is wrong
            row["agent"] = "running"
            row["error"] = exc.format_message()
        rows.append(row)
    lines = [f"store: {_store_label(config)}"]
    if not rows:
        lines.append("no open sessions")
    for row in rows:
        lines += _status_lines(row)
    _emit({"store": _store_label(config), "sessions": rows}, "\n".join(lines))


@click.command("recover")
@click.argument("session_id", required=False)
@click.option("--resume", "action", flag_value="resume", help="Resume the orphaned session.")
@click.option("--discard", "action", flag_value="discard", help="Throw the session away.")
@click.option("--yes", is_flag=True, help="Do not ask before discarding.")
@click.option("--take-over", is_flag=True, help="Take the lock if its holder appears gone.")
@_json_option
def recover_cmd(session_id: str | None, action: str | None, yes: bool, take_over: bool) -> None:
    """List sessions left by a crash; resume (--resume) or discard (--discard) one.

    With no SESSION_ID the only orphaned session is meant.
    """
    config = _obj().config
    session = _session_cls()(config)
    if action is None:
        orphans = [o.as_dict() for o in session.find_orphans()]
        lines = [
            f"{o['session_id']}  {o['projekt_id']}/{o['stage']}  user={o['user']}  "
            f"pending={len(o['pending'])}  deleted={len(o['deleted'])}  crash={o['kind']}  "
            f"backup={o['backup_path']}"
            for o in orphans
        ] or ["no orphaned sessions"]
        if orphans:
            lines.append("resume with `agent recover --resume [SESSION_ID]`, or --discard")
        _emit({"orphans": orphans}, "\n".join(lines))
        return
    if action == "discard":
        if not yes and not _obj().json and sys.stdin.isatty():
            click.confirm("Discard the session's unsaved changes for good?", abort=True)
        elif not yes:
            raise click.UsageError("discarding needs --yes when not asked on a terminal")
        session.discard(session_id, confirm_loss=True)  # confirmed above
        finished = session.finished_commit
        _emit(
            {"discarded": True, "committed": finished is not None, "commit_id": finished},
            _finished_text("the session", finished)
            if finished
            else "discarded: working folder, backup and uncommitted changes removed",
        )
        return
    with _progress() as slot:
        if slot is not None:
            session.progress.connect(slot)
        path = session.resume(session_id, take_over=take_over, watch=False)
    record = session.record
    session.detach()
    from agent.agentd.client import spawn_agent

    spawn_agent(_obj().config_path, record.session_id, config)
    _emit(
        {
            "path": str(path),
            "session_id": record.session_id,
            "state": "active",
            "conflicts": list(record.conflicts),
        },
        str(path)
        + (f"\nconflicts kept twice: {', '.join(record.conflicts)}" if record.conflicts else ""),
    )
