"""What the session's verbs hand back to the caller (``CloseReport``).

Plain data with no imports from the session, so the verbs can share it without importing
each other (``checkin`` builds a ``CloseReport``; ``versions`` returns one inside a restore).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CloseReport:
    """What a ``close`` did."""

    session_id: str
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    manifest_etag: str | None = None
    seconds: float = 0.0
    conflicts: list[str] = field(default_factory=list)
    changed_after_commit: list[str] = field(default_factory=list)
    """Files saved after close's final scan: the folder was kept in place, not cached."""
    not_synchronised: list[str] = field(default_factory=list)
    """Local names the store cannot hold (closed with ``skip_unsupported``)."""
    kept_aside: list[str] = field(default_factory=list)
    """What the store does not hold, moved to ``<stage>.kept-<time>`` beside the folder."""
    folder_walked: bool = False
    """Close walked the whole folder to find what changed (the watcher was not running,
    polled, or had lost events); otherwise the watcher's events told it."""

    def as_dict(self) -> dict[str, object]:
        """For ``--json`` and the agent channel."""
        return {
            "session_id": self.session_id,
            "uploaded": self.uploaded,
            "deleted": self.deleted,
            "bytes_uploaded": self.bytes_uploaded,
            "manifest_etag": self.manifest_etag,
            "seconds": round(self.seconds, 3),
            "conflicts": self.conflicts,
            "changed_after_commit": self.changed_after_commit,
            "not_synchronised": self.not_synchronised,
            "kept_aside": self.kept_aside,
            "folder_walked": self.folder_walked,
        }
