"""``agent history`` / ``show`` / ``restore`` / ``history prune`` / ``locks`` (issue 11).

Registered on the ``agent`` group by ``agent.cli.app``; thin over
``PlantDesignSession.history``, ``show``, ``restore``, ``prune_history`` and
``list_locks``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from agent.cli.common import _emit, _json_option, _obj, _progress, _session_cls
from agent.config import default_user
from agent.text import printable, printable_lines

if TYPE_CHECKING:
    # The stage modules are imported when a history command runs, not by every command.
    from agent.session.versions import RestorePlan
    from agent.stage.keys import CommitInfo


class _DefaultGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to ``list``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["list", *args]
        return super().parse_args(ctx, args)


def _commit_line(c: CommitInfo) -> str:
    when = c.committed_at.strftime("%Y-%m-%d %H:%M:%SZ")
    return (
        f"#{c.seq:<4} {printable(c.commit_id[:12])}  {when}  {printable(c.user):<12} "
        f"+{c.added} ~{c.changed} -{c.removed}  {_size(c.bytes)}"
    )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = float(n) / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


@click.group("history", cls=_DefaultGroup)
def history_group() -> None:
    """The commits of a stage, the versions of a file, and retention.

    \b
    agent history PROJEKT --stage STAGE               commits, oldest first
    agent history PROJEKT --stage STAGE --path FILE   the versions of one file
    agent history prune PROJEKT [--dry-run]           apply [history] retention
    """


@history_group.command("list")
@click.argument("projekt_id")
@click.option("--stage", required=True, help="The stage, e.g. planning.")
@click.option("--path", default=None, help="Show the versions of this file instead.")
@_json_option
def history_list(projekt_id: str, stage: str, path: str | None) -> None:
    """List a stage's commits (id, when, who, files +added ~changed -removed, bytes)."""
    session = _session_cls()(_obj().config)
    found = session.history(projekt_id, stage, path)
    if path is None:
        from agent.stage.keys import CommitInfo

        commits = [c for c in found if isinstance(c, CommitInfo)]
        lines = [_commit_line(c) for c in commits] or [
            f"{projekt_id}/{stage} has no history yet (it starts with the next commit)"
        ]
        _emit({"commits": [c.as_dict() for c in commits]}, "\n".join(lines))
        return
    from agent.stage.history import FileVersion

    versions = [v for v in found if isinstance(v, FileVersion)]
    lines = [
        _commit_line(v.commit)
        + ("  deleted" if v.entry is None else f"  {v.entry.sha256[:12]} {_size(v.entry.size)}")
        for v in versions
    ] or [f"{path} is in no commit of {projekt_id}/{stage}'s history"]
    _emit({"path": path, "versions": [v.as_dict() for v in versions]}, "\n".join(lines))


@history_group.command("prune")
@click.argument("projekt_id")
@click.option("--dry-run", is_flag=True, help="Only show what would be deleted.")
@_json_option
def history_prune(projekt_id: str, dry_run: bool) -> None:
    """Delete the commits and file versions that [history] retention lets go.

    A commit goes when it is older than keep_days and not among the newest
    keep_commits; a version goes when no kept commit of any stage needs it.
    """
    session = _session_cls()(_obj().config)
    plan = session.prune_history(projekt_id, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    text = (
        f"{verb} {len(plan.commits)} commits and {len(plan.versions)} file versions "
        f"({_size(plan.version_bytes)}); {plan.kept_commits} commits kept"
    )
    _emit({**plan.as_dict(), "dry_run": dry_run}, text)


@click.command("show")
@click.argument("projekt_id")
@click.option("--stage", required=True, help="The stage, e.g. planning.")
@click.option("--commit", "commit", required=True, help="Commit id (6+ characters) or #SEQ.")
@click.option("--path", required=True, help="The file, as in the working folder.")
@click.option(
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write that version (written whole or not at all).",
)
@_json_option
def show_cmd(projekt_id: str, stage: str, commit: str, path: str, output: Path) -> None:
    """Write one old version of one file; needs no lock."""
    session = _session_cls()(_obj().config)
    version = session.show(projekt_id, stage, commit=commit, path=path, output=output)
    _emit(
        {**version.as_dict(), "output": str(output)},
        f"{printable(path)} as of commit #{version.commit.seq} "
        f"({printable(version.commit.commit_id[:12])}) written to {printable(output)}",
    )


_PLAN_LINES = 20  # per kind in the text shown; --json lists every path


def _plan_text(where: str, plan: RestorePlan) -> str:
    c = plan.restored_from
    lines = [
        f"restore {where} to commit #{c.seq} ({printable(c.commit_id[:12])}, "
        f"{printable(c.user)}) as a new commit: +{len(plan.added)} ~{len(plan.changed)} "
        f"-{len(plan.removed)}"
    ]
    for verb, rels in (("add", plan.added), ("change", plan.changed), ("remove", plan.removed)):
        lines += [f"  {verb} {rel}" for rel in rels[:_PLAN_LINES]]
        if len(rels) > _PLAN_LINES:
            lines.append(f"  ... and {len(rels) - _PLAN_LINES} more to {verb}")
    return "\n".join(lines)


@click.command("restore")
@click.argument("projekt_id")
@click.argument("paths", nargs=-1)
@click.option("--stage", required=True, help="The stage, e.g. planning.")
@click.option("--commit", "commit", required=True, help="Commit id (6+ characters) or #SEQ.")
@click.option("--user", default=None, help="Who restores (default: your login name).")
@click.option(
    "--yes", is_flag=True, help="Do not ask before restoring (needed with --json or no terminal)."
)
@_json_option
def restore_cmd(  # click passes every parameter by name
    *, projekt_id: str, paths: tuple[str, ...], stage: str, commit: str, user: str | None, yes: bool
) -> None:
    """Bring the stage (or PATHS: files or folders) back to a commit, as a new commit.

    Shows what it will add, change and remove and asks on a terminal (--yes: do
    not ask; scripts and --json must pass it). It removes every file the commit
    did not have, however many; the state before stays in the history. Takes the
    stage lock like `agent open` (exit 5 if someone holds it), puts the old
    versions in place and commits; history is never rewritten. If someone
    commits between showing and restoring, nothing is restored (exit 13).
    """
    interactive = not _obj().json and sys.stdin.isatty()
    if not yes and not interactive:
        # Before any request: a script must not hang on a question it cannot answer.
        raise click.UsageError(
            "restoring needs --yes when not asked on a terminal (with --json always)"
        )
    session = _session_cls()(_obj().config)
    plan = session.plan_restore(projekt_id, stage, commit=commit, paths=list(paths))
    if not _obj().json:
        click.echo(printable_lines(_plan_text(f"{projekt_id}/{stage}", plan)))
    if not yes and not plan.is_empty:
        click.confirm("Restore?", abort=True)
    with _progress() as slot:
        if slot is not None:
            session.progress.connect(slot)
        report = session.restore(
            projekt_id,
            user or default_user(),
            stage,
            commit=commit,
            paths=list(paths),
            expected=plan,
        )
    _emit(
        report.as_dict(),
        f"restored {len(report.written)} files, removed {len(report.plan.removed)} from "
        f"commit #{report.restored_from.seq}; committed as {report.commit_id}",
    )


@click.command("locks")
@click.argument("projekt_ids", nargs=-1)
@_json_option
def locks_cmd(projekt_ids: tuple[str, ...]) -> None:
    """Every stage lock (of PROJEKT_IDS, or of every project): who works on what.

    Held, released, expired or corrupt; holder, machine, since, heartbeat age, and
    "appears gone" when the holder's heartbeat is older than lock.stale_after.
    """
    session = _session_cls()(_obj().config)
    rows = session.list_locks(list(projekt_ids))
    lines = []
    p = printable  # bucket content: one row per lock, whatever its fields hold (issue 19)
    for r in rows:
        where = f"{p(r.projekt_id)}/{p(r.stage)}"
        if r.state == "corrupt":
            lines.append(f"{where}  CORRUPT: {p(r.problem)}")
        elif r.state == "released":
            lines.append(f"{where}  free (last: {p(r.user)} on {p(r.machine)})")
        else:
            gone = "  APPEARS GONE" if r.appears_gone else ""
            since = r.since.strftime("%Y-%m-%d %H:%M") if r.since else "?"
            lines.append(
                f"{where}  {r.state} by {p(r.user)} on {p(r.machine)} since {since}, "
                f"heartbeat {r.heartbeat_age_seconds:.0f}s ago{gone}"
            )
    _emit({"locks": [r.as_dict() for r in rows]}, "\n".join(lines) or "no stage locks")
