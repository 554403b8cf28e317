"""Names and the key layout in the bucket (DESIGN.md "Key layout"), pure functions only.

::

    {projekt_id}/.objects/{sha256}               every file body, once, by its content
    {projekt_id}/{stage}.manifest.json           committed manifest (the truth, with .objects)
    {projekt_id}/.history/{stage}/{key}          one kept manifest per commit
    {projekt_id}/{stage}.commit.json             commit intent (while a commit is applied)
    {projekt_id}/{stage}.lock.json               the stage lock
    {projekt_id}/{stage}/{path}                  the plain tree: a view of the manifest
    {projekt_id}/.sessions/{session_id}/{path}   staging of agents before content addressing

The store applies the configured prefix; these keys are relative to it.
Every relative path is checked (``agent.names``) before it becomes a key; local paths
are reached by ``agent.folder.workfolder``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.errors import InvalidNameError
from agent.names import validate_name, validate_rel_path

__all__ = ["CommitInfo", "StageKeys"]


_HISTORY_STAMP = "%Y%m%dT%H%M%SZ"
_HISTORY_KEY = re.compile(
    r"^(?P<seq>\d{10})~(?P<when>\d{8}T\d{6}Z)~(?P<commit_id>[0-9a-f]{32})~(?P<added>\d+)"
    r"~(?P<changed>\d+)~(?P<removed>\d+)~(?P<bytes>\d+)~(?P<user>[A-Za-z0-9_.\-]{1,128})\.json$"
)
_UNSAFE_IN_KEY = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclass(frozen=True)
class CommitInfo:
    """One commit of the version history, as its key encodes it (issue 11).

    ``{projekt}/.history/{stage}/{seq}~{when}~{commit_id}~{added}~{changed}~{removed}
    ~{bytes}~{user}.json``: a listing alone shows the history, without reading
    any object.
    """

    seq: int
    commit_id: str
    committed_at: datetime
    user: str
    added: int
    changed: int
    removed: int
    bytes: int
    key: str = ""

    def key_in(self, keys: StageKeys) -> str:
        """The history key of this commit in ``keys``' stage."""
        user = _UNSAFE_IN_KEY.sub("_", self.user)[:128] or "unknown"
        when = self.committed_at.astimezone(UTC).strftime(_HISTORY_STAMP)
        return (
            f"{keys.history_prefix}{self.seq:010d}~{when}~{self.commit_id}~{self.added}"
            f"~{self.changed}~{self.removed}~{self.bytes}~{user}.json"
        )

    @classmethod
    def parse(cls, keys: StageKeys, key: str) -> CommitInfo | None:
        """Read a history key; ``None`` for a key that is not one (never trusted)."""
        if not key.startswith(keys.history_prefix):
            return None
        match = _HISTORY_KEY.match(key.removeprefix(keys.history_prefix))
        if match is None:
            return None
        try:
            when = datetime.strptime(match["when"], _HISTORY_STAMP).replace(tzinfo=UTC)
        except ValueError:  # the right shape, an impossible date (month 13): not ours
            return None
        return cls(
            seq=int(match["seq"]),
            commit_id=match["commit_id"],
            committed_at=when,
            user=match["user"],
            added=int(match["added"]),
            changed=int(match["changed"]),
            removed=int(match["removed"]),
            bytes=int(match["bytes"]),
            key=key,
        )

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "seq": self.seq,
            "commit_id": self.commit_id,
            "committed_at": self.committed_at.isoformat(),
            "user": self.user,
            "added": self.added,
            "changed": self.changed,
            "removed": self.removed,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class StageKeys:
    """The keys of one project stage."""

    projekt_id: str
    stage: str

    def __post_init__(self) -> None:
        validate_name("projekt_id", self.projekt_id)
        validate_name("stage", self.stage)

    @property
    def lock(self) -> str:
        """``{projekt_id}/{stage}.lock.json``."""
        return f"{self.projekt_id}/{self.stage}.lock.json"

    @property
    def manifest(self) -> str:
        """``{projekt_id}/{stage}.manifest.json``."""
        return f"{self.projekt_id}/{self.stage}.manifest.json"

    @property
    def intent(self) -> str:
        """``{projekt_id}/{stage}.commit.json``: the commit intent (roll-forward record)."""
        return f"{self.projekt_id}/{self.stage}.commit.json"

    @property
    def committed_prefix(self) -> str:
        """``{projekt_id}/{stage}/``."""
        return f"{self.projekt_id}/{self.stage}/"

    def committed(self, rel: str) -> str:
        """The committed key of a working-copy path."""
        return self.committed_prefix + validate_rel_path(rel)

    @property
    def history_prefix(self) -> str:
        """``{projekt_id}/.history/{stage}/``: one object per commit (version history)."""
        return f"{self.projekt_id}/.history/{self.stage}/"

    @property
    def objects_prefix(self) -> str:
        """``{projekt_id}/.objects/``: every file body of the project, once, by sha256."""
        return f"{self.projekt_id}/.objects/"

    def version(self, sha256: str) -> str:
        """The key of a content (``.objects/{sha256}``: stored once per project)."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise InvalidNameError(f"{sha256!r} is not a sha256 hex digest")
        return self.objects_prefix + sha256

    def staging_prefix(self, session_id: str) -> str:
        """``{projekt_id}/.sessions/{session_id}/``: staging of an agent before content
        addressing (a session it left is still cleaned up on discard)."""
        validate_name("session_id", session_id)
        return f"{self.projekt_id}/.sessions/{session_id}/"

    def staged(self, session_id: str, rel: str) -> str:
        """The staging key of a working-copy path in one session."""
        return self.staging_prefix(session_id) + validate_rel_path(rel)

    def rel_from_committed(self, key: str) -> str:
        """The working-copy path of a committed key (validated)."""
        if not key.startswith(self.committed_prefix):
            raise InvalidNameError(f"key {key!r} is not under {self.committed_prefix!r}")
        return validate_rel_path(key[len(self.committed_prefix) :], key=key)
