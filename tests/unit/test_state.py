"""The transition table, without I/O."""

from __future__ import annotations

import itertools

import pytest

from agent.errors import InvalidTransitionError, SessionError
from agent.state import TRANSITIONS, SessionState, check_transition

S = SessionState


@pytest.mark.parametrize(
    "path",
    [
        [S.IDLE, S.ACQUIRING, S.DOWNLOADING, S.ACTIVE, S.UPLOADING, S.CLOSED],
        [S.IDLE, S.ACQUIRING, S.RESTORING, S.ACTIVE, S.UPLOADING, S.CLOSED],
        [S.ACTIVE, S.RECOVERING, S.CLOSED],
    ],
    ids=["online", "resume", "crash"],
)
def test_design_sequences_are_allowed(path: list[SessionState]) -> None:
    """Every sequence DESIGN.md lists passes the table."""
    for old, new in itertools.pairwise(path):
        check_transition(old, new)


@pytest.mark.parametrize("state", [s for s in S if s is not S.CLOSED])
def test_abort_reaches_closed_from_any_open_state(state: SessionState) -> None:
    """Abort: any state but CLOSED may go to CLOSED."""
    check_transition(state, S.CLOSED)


def test_closed_is_final() -> None:
    """Nothing leaves CLOSED."""
    assert frozenset() == TRANSITIONS[S.CLOSED]
    with pytest.raises(InvalidTransitionError, match="from closed to acquiring"):
        check_transition(S.CLOSED, S.ACQUIRING)


def test_illegal_transition_is_a_session_error_naming_both_states() -> None:
    """Skipping the download is refused with a SessionError naming both states."""
    with pytest.raises(SessionError, match="from acquiring to active"):
        check_transition(S.ACQUIRING, S.ACTIVE)


# DESIGN.md "Session states" plus a failed close going back to ACTIVE (or to the crash
# path), written out here so that an edge added to or dropped from agent/state.py shows.
LEGAL = {
    (S.IDLE, S.ACQUIRING),
    (S.IDLE, S.ACTIVE),  # attach: the background agent continues an open session
    (S.IDLE, S.CLOSED),
    (S.ACQUIRING, S.DOWNLOADING),
    (S.ACQUIRING, S.RESTORING),
    (S.ACQUIRING, S.CLOSED),
    (S.DOWNLOADING, S.ACTIVE),
    (S.DOWNLOADING, S.CLOSED),
    (S.RESTORING, S.ACTIVE),
    (S.RESTORING, S.CLOSED),
    (S.ACTIVE, S.UPLOADING),
    (S.ACTIVE, S.RECOVERING),
    (S.ACTIVE, S.CLOSED),
    (S.UPLOADING, S.ACTIVE),
    (S.UPLOADING, S.RECOVERING),
    (S.UPLOADING, S.CLOSED),
    (S.RECOVERING, S.CLOSED),
}


def test_the_table_has_exactly_the_agreed_edges() -> None:
    """TRANSITIONS lists exactly the agreed edges, for every state."""
    assert set(S) == set(TRANSITIONS)
    assert LEGAL == {(old, new) for old, targets in TRANSITIONS.items() for new in targets}


@pytest.mark.parametrize(
    ("old", "new"), list(itertools.product(S, S)), ids=lambda s: str(s) if isinstance(s, S) else ""
)
def test_every_pair_of_states_is_allowed_or_refused_by_the_table(
    old: SessionState, new: SessionState
) -> None:
    """check_transition passes each edge in TRANSITIONS and refuses any other pair, naming both."""
    if new in TRANSITIONS[old]:
        check_transition(old, new)
    else:
        with pytest.raises(InvalidTransitionError, match=f"from {old} to {new}"):
            check_transition(old, new)


def test_state_values_are_the_signal_contract() -> None:
    """The int values sent by state_changed never change."""
    assert [0, 1, 2, 3, 4, 5, 6, 7] == [int(s) for s in S]
    assert "downloading" == str(S.DOWNLOADING)
