"""``agent open`` / ``_serve`` / ``close`` / ``flush`` / ``abort``: a session's life.

Registered on the ``agent`` group by ``agent.cli.app``.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import suppress
from typing import Any

import click

from agent.cli.common import (
    EXIT_INTERRUPTED,
    _emit,
    _finished_text,
    _json_option,
    _obj,
    _progress,
    _session_cls,
)
from agent.config import default_user
from agent.errors import AgentError


@click.command("open")
@click.argument("projekt_id")
@click.option("--user", default=None, help="Who edits (default: your login name).")
@click.option("--stage", required=True, help="The stage to edit, e.g. planning.")
@click.option(
    "--take-over",
    is_flag=True,
    help="Take the lock from yourself on another machine, or from a holder whose "
    "heartbeat is stale (appears gone).",
)
@click.option(
    "--foreground",
    is_flag=True,
    help="Keep the agent attached to this terminal; Ctrl-C closes the session cleanly.",
)
@_json_option
def open_cmd(
    projekt_id: str, user: str | None, stage: str, take_over: bool, foreground: bool
) -> None:
    """Open an editing session: lock the stage, download it, start the background agent.

    Prints the working folder. The background agent watches it and streams every
    saved change to the store until `agent close` or `agent abort`.
    """
    config = _obj().config
    session = _session_cls()(config)
    with _progress() as slot:
        if slot is not None:
            session.progress.connect(slot)
        path = session.open(
            projekt_id, user or default_user(), stage, take_over=take_over, watch=foreground
        )
    record = session.record
    info = {
        "path": str(path),
        "projekt_id": projekt_id,
        "stage": stage,
        "session_id": record.session_id,
        "state": "active",
    }
    if foreground:
        _run_foreground(session, info)
        return
    session.detach()
    from agent.agentd.client import spawn_agent

    try:
        record = spawn_agent(_obj().config_path, record.session_id, config)
    except AgentError:
        # Nothing was edited yet: discard rather than leave a lock with no agent.
        _session_cls().attach(config, session_id=record.session_id, to_discard=True).abort()
        raise
    info["agent_pid"] = record.agent_pid
    _emit(info, str(path))


def _run_foreground(session: Any, info: dict[str, Any]) -> None:
    from agent.agentd.server import AgentServer
    from agent.platform import set_interrupt_handler
    from agent.session import crash

    crash.host_handles("SIGINT")  # Ctrl-C closes (below); SIGTERM/SIGHUP still save
    server = AgentServer(session, _obj().config)
    ctrl_c = _CtrlC(server)
    # Ours from before the folder is printed: a Ctrl-C at any moment from then on asks
    # for the close; it never raises KeyboardInterrupt in the middle of the print
    # (that aborted, left the session to the exit hook, and issue 20's uploader logging).
    set_interrupt_handler(ctrl_c)
    server.start()
    _emit(info, f"{info['path']}\nwatching; Ctrl-C closes the session")
    server.serve_forever()
    ctrl_c.closing = True
    if not session.is_closed:
        click.echo("closing ...", err=True)
        report = session.close()
        _emit({**report.as_dict(), "state": "closed"}, _close_text(report.as_dict()))
    ctrl_c.done = True


class _CtrlC:
    """Ctrl-C in ``open --foreground``: the first closes the session, the second says
    how to leave, the third leaves at once (the session stays for ``agent recover``)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.closing = False  # the close has started (asked by Ctrl-C or by `agent close`)
        self.done = False
        self.presses = 0

    def __call__(self, _signum: int, _frame: object) -> None:
        if self.done:
            return
        self.presses += 1
        if not self.closing and self.presses == 1:
            self.closing = True
            self.server.shutdown()  # serve_forever returns (now, or as soon as it runs)
            return
        if self.presses <= 2:
            _say_now("close in progress; press again to leave it for `agent recover`")
            return
        _say_now(
            "left unfinished: the session and its changes stay on this machine; "
            "`agent recover` resumes it"
        )
        from agent.platform import exit_now

        exit_now(EXIT_INTERRUPTED)


def _say_now(text: str) -> None:
    """One line on stderr in one write: safe in a signal handler that interrupted a print."""
    with suppress(OSError):
        os.write(sys.stderr.fileno(), (text + "\n").encode())


@click.command("_serve", hidden=True)
@click.argument("session_id")
def serve_cmd(session_id: str) -> None:
    """Run the background agent of SESSION_ID (started by `agent open`)."""
    from agent.agentd.server import AgentServer

    config = _obj().config
    session = _session_cls().attach(config, session_id=session_id)
    session.install_crash_handler()
    session.start_streaming()
    server = AgentServer(session, config)
    server.start()
    try:
        server.serve_forever()
    except SystemExit as exc:
        # The crash handler has saved what it could within its bound. An upload hung
        # in flight must not keep this process (and so the session) alive: interpreter
        # exit would wait for the transfer pool's threads.
        logging.shutdown()
        os._exit(exc.code if isinstance(exc.code, int) else 1)


def _client(projekt_id: str | None, stage: str | None) -> Any:
    from agent.agentd.client import AgentClient
    from agent.session.records import SessionStore

    config = _obj().config
    record = SessionStore(config.paths.state_dir).find_one(projekt_id, stage)
    return AgentClient(record, config.paths)


def _close_text(report: dict[str, Any]) -> str:
    text = (
        f"closed: {len(report['uploaded'])} uploaded, {len(report['deleted'])} deleted "
        f"({report['bytes_uploaded']} bytes) in {report['seconds']:.1f}s"
    )
    if report.get("not_synchronised"):
        text += "\nnot synchronised (name not storable): " + ", ".join(report["not_synchronised"])
    if report.get("kept_aside"):
        text += "\nkept beside the working folder (not in the store): " + ", ".join(
            report["kept_aside"]
        )
    return text


@click.command("close")
@click.argument("projekt_id", required=False)
@click.option("--stage", default=None, help="Which session, when several are open.")
@click.option(
    "--allow-mass-delete",
    is_flag=True,
    help="Commit even if more than half of the stage's files were deleted.",
)
@click.option(
    "--skip-unsupported",
    is_flag=True,
    help="Commit even if some local names cannot be stored (they are kept aside, not sent).",
)
@_json_option
def close_cmd(
    projekt_id: str | None, stage: str | None, allow_mass_delete: bool, skip_unsupported: bool
) -> None:
    """Send what is left, commit the session and release the lock.

    Refuses (exit 11) while a local file has a name the store cannot hold, unless
    --skip-unsupported.
    """
    client = _client(projekt_id, stage)
    args = {"allow_mass_delete": allow_mass_delete, "skip_unsupported": skip_unsupported}
    with _progress() as slot:
        report = client.call("close", args, on_progress=slot)
    _emit({**report, "state": "closed"}, _close_text(report))


@click.command("flush")
@click.argument("projekt_id", required=False)
@click.option("--stage", default=None, help="Which session, when several are open.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
@_json_option
def flush_cmd(projekt_id: str | None, stage: str | None, timeout: float) -> None:
    """Wait until every saved change is in the store (nothing pending)."""
    result = _client(projekt_id, stage).call("flush", {"timeout": timeout})
    _emit(
        result, "flushed: nothing pending" if result["flushed"] else "still pending after timeout"
    )
    if not result["flushed"]:
        raise click.exceptions.Exit(10)


@click.command("abort")
@click.argument("projekt_id", required=False)
@click.option("--stage", default=None, help="Which session, when several are open.")
@_json_option
def abort_cmd(projekt_id: str | None, stage: str | None) -> None:
    """Discard the session's changes and release the lock."""
    from agent.errors import AgentUnreachableError
    from agent.platform import pid_alive

    client = _client(projekt_id, stage)
    record = client.record
    try:
        answer = client.call("abort")
        finished = answer.get("finished_commit") if isinstance(answer, dict) else None
    except AgentUnreachableError:
        if record.agent_pid is not None and pid_alive(record.agent_pid):
            raise
        # The agent is gone; discarding needs no agent.
        gone = _session_cls().attach(_obj().config, session_id=record.session_id, to_discard=True)
        gone.abort()
        finished = gone.finished_commit
    where = f"{record.projekt_id}/{record.stage}"
    _emit(
        {
            "session_id": record.session_id,
            "state": "closed",
            "aborted": True,
            "committed": finished is not None,
            "commit_id": finished,
        },
        _finished_text(where, finished)
        if finished
        else f"aborted {where}: changes discarded, lock released",
    )
