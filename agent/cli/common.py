"""What the command modules share: the invocation's state, ``--json``, output, progress.

``_Ctx`` is ``click.Context.obj``; ``_emit`` prints JSON or text; ``_progress`` is the
progress slot; the ``EXIT_*`` codes that are not an error class's (see ``agent.cli.app``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from agent.config import AgentConfig, load_config
from agent.text import printable, printable_lines

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
            from agent.log import configure_logging, structlog_without_rich

            structlog_without_rich()  # this process is ours: no rich tracebacks to offer
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


def _session_cls() -> Any:
    from agent.session import PlantDesignSession

    return PlantDesignSession


def _finished_text(where: str, commit_id: str | None) -> str:
    """What abort/discard say when they finished an interrupted commit instead."""
    return (
        f"{where}: the interrupted commit {commit_id} was finished; your changes are "
        "committed (a started commit is only ever completed). Lock released, working "
        "folder removed"
    )


def _store_label(config: AgentConfig) -> str:
    loc = config.store_location()
    if loc.scheme == "file":
        return f"file://{loc.path}"
    label = f"s3://{loc.bucket}/{loc.prefix}".rstrip("/")
    return f"{label} at {config.store.endpoint_url}" if config.store.endpoint_url else label
