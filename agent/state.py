"""Session states and the one transition table (DESIGN.md "Session states").

The int values are part of the ``state_changed`` signal's contract with the host
application: never renumber them.
"""

from __future__ import annotations

from enum import IntEnum

from agent.errors import InvalidTransitionError

__all__ = ["TRANSITIONS", "SessionState", "check_transition"]


class SessionState(IntEnum):
    """Where a session is in its life."""

    IDLE = 0  # nothing open yet
    ACQUIRING = 1  # taking the stage lock
    DOWNLOADING = 2  # bringing the committed working copy down (online open)
    RESTORING = 3  # rebuilding the working copy of an interrupted session (resume)
    ACTIVE = 4  # the user edits; changes stream to staging
    UPLOADING = 5  # close: flushing, committing, releasing
    RECOVERING = 6  # a crash handler is saving what it can
    CLOSED = 7  # finished, for good; a session object is not reused

    def __str__(self) -> str:
        return self.name.lower()


S = SessionState

TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    # IDLE -> ACTIVE: ``attach``, another process (the background agent) continues
    # a session that is already open and holds its lock.
    S.IDLE: frozenset({S.ACQUIRING, S.ACTIVE, S.CLOSED}),
    S.ACQUIRING: frozenset({S.DOWNLOADING, S.RESTORING, S.CLOSED}),
    S.DOWNLOADING: frozenset({S.ACTIVE, S.CLOSED}),
    S.RESTORING: frozenset({S.ACTIVE, S.CLOSED}),
    S.ACTIVE: frozenset({S.UPLOADING, S.RECOVERING, S.CLOSED}),
    # A failed flush/commit goes back to ACTIVE: the lock and the work are kept.
    S.UPLOADING: frozenset({S.CLOSED, S.ACTIVE, S.RECOVERING}),
    S.RECOVERING: frozenset({S.CLOSED}),
    S.CLOSED: frozenset(),
}


def check_transition(current: SessionState, new: SessionState) -> None:
    """Raise ``InvalidTransitionError`` unless ``current -> new`` is in the table."""
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(str(s) for s in sorted(TRANSITIONS[current])) or "nothing"
        raise InvalidTransitionError(
            f"session cannot go from {current} to {new} (from {current} it may go to: {allowed})"
        )
