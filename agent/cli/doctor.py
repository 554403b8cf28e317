"""``agent doctor``: check that the configured store can hold locks and data.

Each check is independent and reports what it found; a failed check carries the
exit code of the error class it met, so scripts can tell "wrong credentials"
from "store ignores conditional writes".
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from typing import TYPE_CHECKING

import click

from agent.cli.common import _emit, _json_option, _obj, _store_label
from agent.config import AgentConfig
from agent.errors import AgentError, IntentRefusedError, PreconditionFailedError

if TYPE_CHECKING:
    # The store and stage modules are imported when doctor runs, not by every command.
    from agent.stage.keys import StageKeys
    from agent.store import ObjectStore

__all__ = ["Check", "doctor_cmd", "run_checks"]

MAX_SKEW_SECONDS = 60.0


@dataclass(frozen=True)
class Check:
    """One doctor check's outcome."""

    name: str
    ok: bool
    detail: str
    exit_code: int = 0
    found: str | None = None
    """A short machine-readable finding (``--json``), e.g. ``honoured`` or ``ignored``."""
    warning: bool = False
    """Passed, but worth knowing (shown as ``warn``)."""

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        out: dict[str, object] = {"name": self.name, "ok": self.ok, "detail": self.detail}
        if self.found is not None:
            out["found"] = self.found
        if self.warning:
            out["warning"] = True
        return out


def _fail(name: str, exc: AgentError) -> Check:
    return Check(name, False, f"{type(exc).__name__}: {exc.format_message()}", exc.exit_code)


def _check_listing(store: ObjectStore) -> Check:
    try:
        found = list(islice(store.list(""), 5))
    except AgentError as exc:
        return _fail("bucket and credentials", exc)
    return Check("bucket and credentials", True, f"listing works ({len(found)} objects sampled)")


def _check_clock(store: ObjectStore) -> Check:
    try:
        remote = store.server_time()
    except AgentError as exc:
        return _fail("clock skew", exc)
    skew = (datetime.now(UTC) - remote).total_seconds()
    detail = f"local clock is {skew:+.1f}s from the store's (lock expiry uses the store's clock)"
    return Check(
        "clock skew",
        abs(skew) <= MAX_SKEW_SECONDS,
        detail,
        0 if abs(skew) <= MAX_SKEW_SECONDS else 1,
    )


def _check_conditional(store: ObjectStore) -> Check:
    from agent.stage.locktools import probe_conditional_writes

    try:
        probe_conditional_writes(store)
    except AgentError as exc:
        return _fail("conditional writes (locking)", exc)
    return Check(
        "conditional writes (locking)",
        True,
        "If-None-Match and If-Match are honoured: locks give mutual exclusion",
    )


INTENT_CHECK = "commit intent"
COPY_CHECK = "copy condition (x-amz-copy-source-if-match)"


def _check_copy_condition(store: ObjectStore) -> Check:
    """Copy a probe object pinned to a wrong ETag: a 412 means the pin is honoured.

    A store that copies anyway (moto's S3 server does) stays correct for the agent: each
    commit copy's answer is checked and a wrong one repaired. It is worth knowing all
    the same, so it is a warning, not a failure. The probe keys are always removed.
    """
    base = f".pdagent-probe/copy-{uuid.uuid4().hex}"
    src, dst = f"{base}.src", f"{base}.dst"
    try:
        store.put_bytes(src, b"pdagent copy-condition probe")
        try:
            store.copy(src, dst, if_source_etag="0" * 32)
        except PreconditionFailedError:
            return Check(
                COPY_CHECK,
                True,
                "honoured: a copy pinned to another ETag is refused",
                found="honoured",
            )
        return Check(
            COPY_CHECK,
            True,
            "IGNORED: a copy pinned to another ETag was made anyway. The agent stays correct "
            "(every commit copy's answer is checked; a wrong copy is sent again and copied "
            "again), but a co-worker's write during a commit costs a repair",
            found="ignored",
            warning=True,
        )
    except AgentError as exc:
        return _fail(COPY_CHECK, exc)
    finally:
        with contextlib.suppress(AgentError):
            store.delete_many([src, dst])


def _check_intent(store: ObjectStore, keys: StageKeys) -> Check:
    """The stage's commit intent, checked as the next lock holder checks it: a refused
    one (never executed) blocks every commit to the stage, so the check fails."""
    from agent.stage.intent import inspect_intent

    try:
        finding = inspect_intent(store, keys)
    except AgentError as exc:
        return _fail(INTENT_CHECK, exc)
    if finding.state == "refused":
        return Check(
            INTENT_CHECK,
            False,
            f"{keys.intent} {finding.describe()}",
            IntentRefusedError.exit_code,
            found=f"refused: {finding.problem}",
        )
    return Check(INTENT_CHECK, True, f"{keys.intent}: {finding.describe()}", found=finding.state)


def run_checks(config: AgentConfig, *, stage: StageKeys | None = None) -> list[Check]:
    """Run every check against the configured store (and ``stage``'s intent, if given)."""
    from agent.store import open_store

    try:
        store = open_store(config)
    except AgentError as exc:
        return [_fail("open store", exc)]
    try:
        listing = _check_listing(store)
        if not listing.ok:
            return [listing]
        checks = [
            listing,
            _check_conditional(store),
            _check_copy_condition(store),
            _check_clock(store),
        ]
        if stage is not None:
            checks.append(_check_intent(store, stage))
        return checks
    finally:
        store.close()


@click.command("doctor")
@click.argument("projekt_id", required=False)
@click.option(
    "--stage", default=None, help="Also check this stage's commit intent (needs PROJEKT)."
)
@_json_option
def doctor_cmd(projekt_id: str | None, stage: str | None) -> None:
    """Check the store: reachability, credentials, bucket, conditional writes, the copy
    condition (a warning when ignored), clock skew; with PROJEKT --stage STAGE also the
    stage's commit intent (a refused one fails)."""
    if (projekt_id is None) != (stage is None):
        raise click.UsageError("checking a stage needs both PROJEKT and --stage")
    from agent.stage.keys import StageKeys

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
