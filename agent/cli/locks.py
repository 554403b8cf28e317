"""``agent lock show`` / ``lock unlock``: one stage's lock, inspected or broken.

Registered on the ``agent`` group by ``agent.cli.app``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import click

from agent.cli.common import _emit, _json_option, _obj
from agent.config import default_user


@click.group("lock")
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
