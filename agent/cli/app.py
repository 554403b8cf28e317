"""The ``agent`` command line: thin over the library.

Every command takes ``--json`` (one JSON object on stdout, for scripts) and
``--config``. Errors are mapped to exit codes in one place, ``main``, from the
``exit_code`` on each error class (see the README's table).

The commands live in one module per group (``session``, ``status``, ``locks``,
``doctor``, ``history``; their shared helpers in ``common``) and are registered on
``cli`` here; none of them imports this module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from agent import __version__
from agent.cli import history, locks, session, status
from agent.cli.common import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, _Ctx
from agent.cli.doctor import doctor_cmd
from agent.errors import AgentError
from agent.text import printable_lines


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


for _command in (
    session.open_cmd,
    session.serve_cmd,
    session.close_cmd,
    session.flush_cmd,
    session.abort_cmd,
    status.status_cmd,
    status.recover_cmd,
    doctor_cmd,
    locks.lock_group,
    history.history_group,
    history.show_cmd,
    history.restore_cmd,
    history.locks_cmd,
):
    cli.add_command(_command)


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
