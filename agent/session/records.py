"""Session records on disk: ``<state>/sessions/<session_id>/``.

A record is what lets another process (``agent close``, the background agent,
crash recovery) continue a session: who, which stage, where the working copy
is, the lock's ETag, the manifest the session started from, and the local
snapshot of the copy as it was downloaded (``base.json``). Writes are atomic
(temp + fsync + rename), so a crash never leaves half a record.

The state folder is private by construction (issue 9): it is created 0700, its
files 0600, and a state folder that is not owned by this user or that group or
others can write to is refused (``InsecureStateError``), because a record planted
there would steer the agent. Records are parsed as data, and a record whose
working folder lies outside the base folder is refused as damaged.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import from_json

from agent.errors import InsecureStateError, LocalFileError, SessionError
from agent.folder.entries import LocalEntry
from agent.log import get_logger
from agent.names import validate_name
from agent.platform import ensure_private_dir, make_private_dirs, write_private_file
from agent.stage.manifest import Manifest

__all__ = ["Phase", "SessionRecord", "SessionStore"]

log = get_logger(__name__)

Phase = Literal["opening", "active", "committing", "closing", "aborting"]


class SessionRecord(BaseModel):
    """The durable facts of one open session."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    projekt_id: str
    stage: str
    user: str
    machine: str
    pid: int
    work_path: Path
    lock_etag: str | None = None
    base_manifest_etag: str | None = None
    phase: Phase = "opening"
    created_at: datetime
    updated_at: datetime
    agent_pid: int | None = None
    agent_address: str | None = None
    last_error: str | None = None
    conflicts: list[str] = []
    commit_id: str | None = None
    """The commit this session started last (its intent names it)."""
    work_identity: tuple[int, int] | None = None
    """The working folder's ``(st_dev, st_ino)`` when open (or resume) made it: close,
    abort and discard refuse a link or another folder in its place (issue 20)."""


class SessionStore:
    """Reads and writes session records under ``<state>/sessions``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.root = state_dir / "sessions"
        self._locks = state_dir / "stage-locks"
        check_state_dir(state_dir)

    def stage_lock(self, projekt_id: str, stage: str) -> FileLock:
        """A local file lock per stage: one ``open`` of a stage at a time on this machine."""
        validate_name("projekt_id", projekt_id)
        validate_name("stage", stage)
        make_private_dirs(self._locks)
        return FileLock(self._locks / f"{projekt_id}..{stage}.lock", timeout=60, mode=0o600)

    def folder(self, session_id: str) -> Path:
        """The folder of one session's record, journal and snapshot."""
        return self.root / validate_name("session_id", session_id)

    def save(self, record: SessionRecord) -> SessionRecord:
        """Write ``record`` atomically (stamping ``updated_at``) and return what was written."""
        record = record.model_copy(update={"updated_at": datetime.now(UTC)})
        try:
            write_private_file(
                self.folder(record.session_id) / "session.json",
                record.model_dump_json(indent=1).encode(),
            )
        except OSError as exc:
            raise LocalFileError(
                f"cannot write the session record under {self.root}: {exc.strerror or exc}"
            ) from exc
        return record

    def load(self, session_id: str) -> SessionRecord:
        """Read one record; a missing or broken one is a ``SessionError`` saying so."""
        path = self.folder(session_id) / "session.json"
        try:
            record = SessionRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError as exc:
            raise SessionError(f"no session {session_id} on this machine") from exc
        except (ValidationError, ValueError) as exc:
            raise SessionError(
                f"the session record {path} is damaged ({exc.__class__.__name__}); "
                "run `agent recover` to resume or discard that session"
            ) from exc
        except OSError as exc:
            raise LocalFileError(f"cannot read the session record {path}: {exc}") from exc
        problem = self._implausible(record, session_id)
        if problem is not None:
            raise SessionError(
                f"the session record {path} is damaged or forged ({problem}); it is ignored"
            )
        return record

    def _implausible(self, record: SessionRecord, session_id: str) -> str | None:
        """Why a parsed record cannot be trusted as this folder's session, if it cannot."""
        if record.session_id != session_id:
            return f"it names session {record.session_id!r}"
        base = self.state_dir.parent
        work = record.work_path
        if ".." in work.parts or not work.is_relative_to(base):
            return f"its working folder {str(work)!r} is not under the base folder {base}"
        if work in (base, self.state_dir) or work.is_relative_to(self.state_dir):
            return f"its working folder {str(work)!r} is not a working folder"
        return None

    def all(self) -> Iterator[SessionRecord]:
        """Every readable record (damaged ones are logged and skipped)."""
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            if not (entry / "session.json").is_file():
                continue
            try:
                yield self.load(entry.name)
            except SessionError as exc:
                log.warning("session_record_unreadable", path=str(entry), error=str(exc))

    def find(self, projekt_id: str | None = None, stage: str | None = None) -> list[SessionRecord]:
        """Records matching the given projekt/stage (None matches anything)."""
        return [
            r
            for r in self.all()
            if (projekt_id is None or r.projekt_id == projekt_id)
            and (stage is None or r.stage == stage)
        ]

    def find_one(
        self, projekt_id: str | None = None, stage: str | None = None, session_id: str | None = None
    ) -> SessionRecord:
        """The one record matching; a clear ``SessionError`` for none or several."""
        if session_id is not None:
            return self.load(session_id)
        matches = self.find(projekt_id, stage)
        if not matches:
            what = f" on {projekt_id or '*'}/{stage or '*'}" if projekt_id or stage else ""
            raise SessionError(f"no open session{what} on this machine (`agent status` lists them)")
        if len(matches) > 1:
            names = ", ".join(f"{r.projekt_id}/{r.stage}" for r in matches)
            raise SessionError(
                f"several sessions are open ({names}): name one as PROJEKT --stage STAGE"
            )
        return matches[0]

    def save_base(self, session_id: str, files: dict[str, LocalEntry]) -> None:
        """Write the snapshot of the working copy as the session started."""
        write_private_file(
            self.folder(session_id) / "base.json", LocalEntry.many_to_json_chunks(files)
        )

    def load_base(self, session_id: str) -> dict[str, LocalEntry]:
        """Read the snapshot written by ``save_base`` (empty if there is none)."""
        path = self.folder(session_id) / "base.json"
        try:
            raw = from_json(path.read_bytes())
            return {rel: LocalEntry.from_list(v) for rel, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise SessionError(f"the session snapshot {path} is damaged: {exc}") from exc

    def save_base_manifest(self, session_id: str, manifest: Manifest) -> None:
        """Persist the manifest the session is based on (resume merges against it)."""
        write_private_file(self.folder(session_id) / "base_manifest.json", manifest.to_bytes())

    def load_base_manifest(self, session_id: str) -> Manifest | None:
        """The persisted base manifest, ``None`` if the session never had one."""
        path = self.folder(session_id) / "base_manifest.json"
        try:
            return Manifest.parse(path.read_bytes(), key=str(path))
        except FileNotFoundError:
            return None

    def remove(self, session_id: str) -> None:
        """Delete a finished session's record folder."""
        shutil.rmtree(self.folder(session_id), ignore_errors=True)


def check_state_dir(state_dir: Path) -> None:
    """Create the state folder private, or refuse one others could have written to."""
    try:
        problem = ensure_private_dir(state_dir)
    except OSError as exc:
        raise LocalFileError(f"cannot create the state folder {state_dir}: {exc}") from exc
    if problem is not None:
        raise InsecureStateError(
            f"the state folder {state_dir} {problem}. Its session records and tokens "
            "could have been planted or read by another user, so the agent will not use "
            f"it. If it is yours and its contents are trusted, `chmod 700 {state_dir}` "
            "(and make it yours); otherwise move it away and start again"
        )


def new_session_id() -> str:
    """A sortable, unique session id: UTC time plus randomness."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{os.urandom(4).hex()}"
