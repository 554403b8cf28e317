"""The whole exception tree of the agent, factored out to avoid import loops.

::

    AgentError                      exit 1 unless a subclass says otherwise
    ├── ConfigError                 exit 3   bad config file, env override or argument
    │   └── InvalidNameError        exit 3   projekt_id / stage / user / key not acceptable
    ├── LockError                   exit 4
    │   ├── LockHeldError           exit 5   someone else holds the stage
    │   ├── LockLostError           exit 6   our lock was taken while we held it
    │   ├── LockCorruptError        exit 4   the lock body does not parse
    │   └── UnsafeStoreError        exit 4   the store ignores conditional writes
    ├── StoreError                  exit 7
    │   ├── TransientStoreError     exit 8   the only thing that is retried
    │   └── PermanentStoreError     exit 7
    │       ├── AccessDeniedError   exit 9   403: wrong credentials or policy
    │       ├── BucketMissingError  exit 7
    │       ├── NotFoundError       exit 7
    │       ├── ObjectTooLargeError exit 7   a small object read whole is over its limit
    │       ├── PreconditionFailedError exit 7  If-Match / If-None-Match did not hold
    │       └── ContentMismatchError exit 7  an object's bytes are not the manifest's
    ├── TransferError               exit 10  keeps last_exception and failed count
    ├── LocalFileError              exit 11  disk full, permission denied, unsafe path
    │   └── WorkFolderReplacedError exit 22  the working folder is a link or another folder now
    ├── JournalCorruptError         exit 12
    ├── ConflictError               exit 13  someone else committed since our base
    ├── MassDeleteError             exit 14  close would delete most files
    ├── SessionError                exit 15  no session / session already open
    │   ├── PreviousCrashError      exit 16  an unfinished session is on disk
    │   ├── UnsavedWorkError        exit 15  discard would delete changes the store lacks
    │   └── SessionCancelledError   exit 130 open/resume cancelled (abort(), Ctrl-C)
    ├── AgentUnreachableError       exit 17  the background agent does not answer
    ├── CommitBlockedError          exit 18  a started commit cannot be finished yet
    │   └── IntentRefusedError      exit 18  the commit intent is not one we would write
    ├── IntegrityError              exit 19  copied/read bytes are not the recorded ones
    ├── InsecureStateError          exit 20  the state folder is not private to this user
    └── VersionNotFoundError        exit 21  history holds no such commit or version

    InvalidTransitionError(SessionError, RuntimeError)  illegal state move (a bug)

Errors from boto3, sqlite3 and the OS are translated into these at the module
that talks to them (``raise ... from exc``), so callers only ever see this tree.
"""

from __future__ import annotations

from typing import ClassVar


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    exit_code: ClassVar[int] = 1

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg

    def format_message(self) -> str:
        """The text shown to a user."""
        return self.msg


class ConfigError(AgentError):
    """A configuration value, file or argument is not acceptable."""

    exit_code = 3


class InvalidNameError(ConfigError):
    """A projekt_id, stage, user or object key that would be unsafe to use."""


class LockError(AgentError):
    """Something about the stage lock."""

    exit_code = 4


class LockHeldError(LockError):
    """The stage is locked by someone else."""

    exit_code = 5


class LockLostError(LockError):
    """The lock we held was changed by someone else (renewal got 412)."""

    exit_code = 6


class LockCorruptError(LockError):
    """The lock object exists but its body is not a lock."""


class UnsafeStoreError(LockError):
    """The store does not honour conditional writes, so it cannot lock."""


class StoreError(AgentError):
    """The object store refused or failed a request."""

    exit_code = 7


class TransientStoreError(StoreError):
    """Connection error, timeout, 5xx, throttling: worth retrying."""

    exit_code = 8
    retry_at_once: bool = False
    """The first retries need not wait: a pooled connection the store had already closed
    (a stale keep-alive) failed before the request reached the store."""


class PermanentStoreError(StoreError):
    """A 4xx-class answer: retrying would not help."""


class AccessDeniedError(PermanentStoreError):
    """403: credentials are wrong or lack permission."""

    exit_code = 9


class BucketMissingError(PermanentStoreError):
    """The configured bucket (or store folder) does not exist."""


class NotFoundError(PermanentStoreError):
    """The object does not exist."""


class ObjectTooLargeError(PermanentStoreError):
    """An object read whole (lock, manifest, intent, history entry) is over its kind's limit.

    The read stopped after ``limit + 1`` bytes. ``size`` is the size the store stated,
    or ``None`` when it stated none. From ``get_many``, ``oversized`` names every such
    key (key -> size) and ``results`` holds what the call read, ``None`` in their place.
    """

    def __init__(
        self,
        key: str,
        size: int | None,
        limit: int,
        *,
        oversized: dict[str, int | None] | None = None,
        results: list[object] | None = None,
    ) -> None:
        told = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        super().__init__(
            f"the object {key!r} is {told}, over the limit of {limit} bytes for its kind: "
            "it was not read. It was written outside the agent (or the limit is too small "
            "for this project; see the README's security section)"
        )
        self.key = key
        self.size = size
        self.limit = limit
        self.oversized: dict[str, int | None] = oversized or {key: size}
        self.results: list[object] = results or []


class PreconditionFailedError(PermanentStoreError):
    """A conditional write's condition did not hold (412, or 409/404 on some stores)."""


class ContentMismatchError(PermanentStoreError):
    """An object's bytes are not the ones the manifest names (size or sha256 differ)."""


class TransferError(AgentError):
    """One or more transfers failed after their retries."""

    exit_code = 10

    def __init__(
        self, msg: str, *, failed: int = 0, last_exception: BaseException | None = None
    ) -> None:
        super().__init__(msg)
        self.failed = failed
        self.last_exception = last_exception


class LocalFileError(AgentError):
    """A local file could not be read or written (disk full, permissions, unsafe path)."""

    exit_code = 11


class WorkFolderReplacedError(LocalFileError):
    """The working folder is no longer the folder the session opened (a link to another
    folder, or another folder moved into its place): nothing in or from it is touched."""

    exit_code = 22


class JournalCorruptError(AgentError):
    """The session journal cannot be read."""

    exit_code = 12


class ConflictError(AgentError):
    """Someone else committed to the stage since this session's base version."""

    exit_code = 13


class CommitBlockedError(AgentError):
    """A started commit cannot be finished: a staged object changed and no local copy matches.

    Nothing was released: the lock (when ours) and the intent stay, so the commit can
    still be finished once the inputs are back.
    """

    exit_code = 18


class IntentRefusedError(CommitBlockedError):
    """The stage's commit intent is not one this agent would write (a key outside its stage
    or ``.objects/``, an unsafe path, inconsistent fields): refused, left in place, never
    executed. Nobody can commit to the stage until an operator looks at it."""


class IntegrityError(AgentError):
    """Bytes the store returned or copied are not the ones recorded (checksum mismatch)."""

    exit_code = 19


class InsecureStateError(AgentError):
    """A folder the agent keeps private state in is not owned by this user or is writable
    by others: its records and tokens cannot be trusted, so the agent refuses to start."""

    exit_code = 20


class VersionNotFoundError(AgentError):
    """A commit or file version the history does not hold (never existed, or pruned)."""

    exit_code = 21


class MassDeleteError(AgentError):
    """A commit would delete most of the working copy; it needs explicit consent."""

    exit_code = 14


class SessionError(AgentError):
    """The requested operation does not fit the session's situation."""

    exit_code = 15


class PreviousCrashError(SessionError):
    """An unfinished session for this stage is on disk: resume or discard it first."""

    exit_code = 16


class UnsavedWorkError(SessionError):
    """Discarding would delete changes the store has no copy of; ``files`` names them."""

    def __init__(self, msg: str, *, files: list[str] | None = None) -> None:
        super().__init__(msg)
        self.files = list(files or [])


class SessionCancelledError(SessionError):
    """``open``/``resume`` was cancelled (``abort()`` from another thread, or Ctrl-C).

    Nothing is left behind: the lock is released (or was never taken), the partial
    working folder and the session record are removed.
    """

    exit_code = 130


class AgentUnreachableError(AgentError):
    """The background agent process of a session does not answer."""

    exit_code = 17


class InvalidTransitionError(SessionError, RuntimeError):
    """A state change that the transition table does not allow (a bug, not bad input).

    DESIGN.md says an illegal transition is a ``SessionError``; it is also a
    ``RuntimeError`` so that it reads as the programming error it is.
    """
