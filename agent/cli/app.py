"""The ``agent`` command line: thin over the library.

Every command takes ``--json`` (one JSON object on stdout, for scripts) and
``--config``. Errors are mapped to exit codes in one place, ``main``, from the
``exit_code`` on each error class (see the README's table).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from agent.config import AgentConfig, default_user, load_config
from agent.errors import AgentError
from agent.text import printable, printable_lines
from agent.version import __version__

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70


class _Ctx:
    """What the group passes to its commands (``click.Context.obj``; no module state)."""

    def __init__(self) -> None:
        self.config_path: Path | None = None
        self.json = False
        self.verbose = 0
        self._config: AgentConfig | None = None

    @property
    def config(self) -> AgentConfig:
        if self._config is None:
            self._config = load_config(self.config_path)
            from agent.log import configure_logging

            configure_logging(
                self._config.log.model_copy(
                    update={"console_level": "debug" if self.verbose > 1 else "info"}
                )
                if self.verbose
                else self._config.log,
                self._config.paths.state_dir,
            )
        return self._config


def _obj() -> _Ctx:
    """The invocation's ``_Ctx`` (created by ``main`` or, under CliRunner, by the group)."""
    return click.get_current_context().ensure_object(_Ctx)


def _json_option(fn: F) -> F:
    def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.ensure_object(_Ctx).json = True
        return value

    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        expose_value=False,
        callback=set_json,
        is_eager=True,
        help="Print one JSON object on stdout (for scripts).",
    )(fn)


def _emit(data: dict[str, Any], text: str | None = None) -> None:
    """Print ``data`` as JSON in --json mode, else ``text`` (control characters escaped)."""
    if _obj().json:
        click.echo(json.dumps(data, default=str, indent=None))
    elif text is not None:
        click.echo(printable_lines(text))


@contextmanager
def _progress(enabled: bool = True) -> Iterator[Callable[[str, int], None] | None]:
    """A progress slot: a rich bar on a terminal, plain lines otherwise, nothing in --json."""
    if not enabled or _obj().json:
        yield None
        return
    if sys.stderr.isatty():
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        bars: dict[str, Any] = {}
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            transient=False,
            console=None,
        ) as prog:

            def on_progress(message: str, pct: int) -> None:
                message = printable(message)
                if message not in bars:
                    bars[message] = prog.add_task(message, total=100)
                prog.update(bars[message], completed=pct)

            yield on_progress
        return
    last: dict[str, int] = {}

    def plain(message: str, pct: int) -> None:
        message = printable(message)
        step = pct // 10
        if last.get(message) != step:
            last[message] = step
            click.echo(f"{message}: {pct}%", err=True)

    yield plain


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agent")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file (default: $AGENT_CONFIG, else built-in defaults).",
)
@click.option("-v", "--verbose", count=True, help="Log to the console too (-vv: debug).")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, verbose: int) -> None:
    """Edit plant-design project stages kept in S3/R2, safely.

    \b
    agent open PROJEKT --user NAME --stage STAGE   lock, download, start the background agent
    agent status                                   what is open, pending changes, errors
    agent close                                    send the rest, commit, release the lock
    agent abort                                    discard the session, release the lock
    agent recover [--resume | --discard]           after a crash: resume or discard
    agent flush | doctor | lock show | lock unlock
    agent history | show | restore                 versions: list, look at, bring back

    \b
    Exit codes: 0 ok, 2 usage, 3 config/name, 4 lock, 5 lock held, 6 lock lost,
    7 store refused, 8 store unreachable, 9 access denied, 10 transfer, 11 local
    file, 12 journal, 13 conflict, 14 mass delete, 15 session, 16 previous crash,
    17 agent gone, 18 commit blocked, 19 integrity, 20 insecure state folder,
    21 no such version, 70 internal error, 130 interrupted.
    """
    state = ctx.ensure_object(_Ctx)
    state.config_path = config_path
    state.verbose = verbose


def _session_cls() -> Any:
    from agent.session import PlantDesignSession

    return PlantDesignSession


@cli.command("open")
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


@cli.command("_serve", hidden=True)
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


@cli.command("close")
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


@cli.command("flush")
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


@cli.command("abort")
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


def _finished_text(where: str, commit_id: str | None) -> str:
    """What abort/discard say when they finished an interrupted commit instead."""
    return (
        f"{where}: the interrupted commit {commit_id} was finished; your changes are "
        "committed (a started commit is only ever completed). Lock released, working "
        "folder removed"
    )


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


@cli.command("status")
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


@cli.command("recover")
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


def _store_label(config: AgentConfig) -> str:
    loc = config.store_location()
    if loc.scheme == "file":
        return f"file://{loc.path}"
    label = f"s3://{loc.bucket}/{loc.prefix}".rstrip("/")
    return f"{label} at {config.store.endpoint_url}" if config.store.endpoint_url else label


@cli.command("doctor")
@click.argument("projekt_id", required=False)
@click.option(
    "--stage", default=None, help="Also check this stage's commit intent (needs PROJEKT)."
)
@_json_option
def doctor_cmd(projekt_id: str | None, stage: str | None) -> None:
    """Check the store: reachability, credentials, bucket, conditional writes, the copy
    condition (a warning when ignored), clock skew; with PROJEKT --stage STAGE also the
    stage's commit intent (a refused one fails)."""
    from agent.cli.doctor import run_checks
    from agent.stage.keys import StageKeys

    if (projekt_id is None) != (stage is None):
        raise click.UsageError("checking a stage needs both PROJEKT and --stage")
    config = _obj().config
    keys = StageKeys(projekt_id, stage) if projekt_id is not None and stage is not None else None
    checks = run_checks(config, stage=keys)
    ok = all(c.ok for c in checks)
    lines = [f"store: {_store_label(config)}"]
    lines += [
        f"[{'FAIL' if not c.ok else 'warn' if c.warning else 'ok'}] {c.name}: {c.detail}"
        for c in checks
    ]
    _emit(
        {"store": _store_label(config), "ok": ok, "checks": [c.as_dict() for c in checks]},
        "\n".join(lines),
    )
    if not ok:
        failed = next(c for c in checks if not c.ok)
        raise click.exceptions.Exit(failed.exit_code)


@cli.group("lock")
def lock_group() -> None:
    """Inspect or (as an operator) break a stage lock."""


@lock_group.command("show")
@click.argument("projekt_id")
@click.option("--stage", required=True)
@_json_option
def lock_show(projekt_id: str, stage: str) -> None:
    """Show who holds a stage's lock, since when, and its heartbeat; and the stage's
    commit intent: none, finished, unfinished (the next lock holder finishes it) or
    refused (exit 18: never executed, it blocks every commit to the stage)."""
    from agent.errors import IntentRefusedError
    from agent.stage.intent import inspect_intent
    from agent.stage.keys import StageKeys
    from agent.stage.lockbody import read_lock
    from agent.store import open_store

    keys = StageKeys(projekt_id, stage)
    store = open_store(_obj().config)
    try:
        status = read_lock(store, keys.lock, _obj().config.lock)
        intent = inspect_intent(store, keys)
    finally:
        store.close()
    lines = (
        [f"{keys.lock}: no lock object (never locked)"]
        if status is None
        else list(status.describe())
    )
    lines.append(f"commit intent: {intent.describe()}")
    _emit(
        {
            "key": keys.lock,
            "lock": None if status is None else status.as_dict(),
            "intent": intent.as_dict(),
        },
        "\n".join(lines),
    )
    if intent.state == "refused":
        raise click.exceptions.Exit(IntentRefusedError.exit_code)


@lock_group.command("unlock")
@click.argument("projekt_id")
@click.option("--stage", required=True)
@click.option("--force", is_flag=True, help="Required: breaking someone's lock is explicit.")
@click.option("--reason", default="operator unlock", show_default=True)
@click.option("--operator", default=None, help="Who breaks it (default: your login name).")
@_json_option
def lock_unlock(
    projekt_id: str, stage: str, force: bool, reason: str, operator: str | None
) -> None:
    """Break a stage lock (operator). Recorded in the lock body and the log."""
    from agent.platform import machine_name
    from agent.stage.keys import StageKeys
    from agent.stage.locktools import force_unlock
    from agent.store import open_store

    if not force:
        raise click.UsageError(
            "breaking a lock needs --force; the holder may lose the ability to commit. "
            "See `agent lock show` first."
        )
    keys = StageKeys(projekt_id, stage)
    store = open_store(_obj().config)
    try:
        status = force_unlock(
            store,
            keys.lock,
            operator=operator or default_user(),
            machine=machine_name(),
            reason=reason,
        )
    finally:
        store.close()
    _emit(
        {"key": keys.lock, "lock": status.as_dict(), "unlocked": True},
        f"{keys.lock}: released by {operator or default_user()} at "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map errors to exit codes (the only place that does)."""
    state = _Ctx()
    try:
        rc = cli.main(args=argv, prog_name="agent", standalone_mode=False, obj=state)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except AgentError as exc:
        _report_error(state, type(exc).__name__, exc.format_message(), exc.exit_code)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence prints, logs and exits
        import structlog

        structlog.get_logger("agent.cli.app").exception("internal_error")
        _report_error(
            state, "InternalError", f"internal error: {exc!r} (details in the log)", EXIT_INTERNAL
        )
        sys.exit(EXIT_INTERNAL)
    sys.exit(0)


def _report_error(state: _Ctx, kind: str, message: str, code: int) -> None:
    if state.json:
        click.echo(json.dumps({"error": {"type": kind, "message": message, "exit_code": code}}))
    else:
        click.echo(f"error: {printable_lines(message)}", err=True)


# Commands in their own modules register themselves on ``cli`` when imported.
from agent.cli import history as cli_history  # noqa: E402, F401
