"""The commit protocol: intent, one copy per changed path, deletes, fenced manifest, done.

DESIGN.md "Commit". Every file body is already at ``{projekt_id}/.objects/{sha256}``
(the streamer sent it there, once, checked by size and ETag). ``begin`` writes
``{projekt_id}/{stage}.commit.json`` (the *intent*: session, commit id, base
manifest ETag, the new manifest, the copies with each object's ETag and sha256,
the deletes) before any committed key is touched. ``apply`` then makes the stage
equal the intent's manifest:

1. one server-side copy per changed path, ``.objects/{sha256}`` -> the plain key,
   pinned with ``x-amz-copy-source-if-match`` to the object's recorded ETag and
   checked by the ETag it answers (a store that ignores the pin is caught there);
   an object that vanished or holds other bytes is sent again by ``reupload`` from
   the local file if that still has the recorded hash, otherwise
   ``CommitBlockedError``;
2. deletes; 3. the manifest, ``If-Match`` the base, carrying the commit id;
4. the history entry; 5. the intent marked ``done``.

The replaced versions need no keeping: their bytes are at ``.objects/{old sha256}``.
A stage committed before content addressing (manifest version 1) has its plain keys
as the only copy: its first commit here copies each of them into ``.objects/``
(pinned, checked) and writes a version-2 manifest, so old stages migrate without a
separate step. An intent written by such an older agent (``source: staging``) is
rolled forward from its staging prefix as it was written.

Every step is idempotent, so ``apply`` is also the roll-forward: a retried close,
resume, abort, discard and anyone's later open run it on an unfinished intent.
Once an intent exists the commit is only ever finished, never abandoned.
The intent's shape, reading and checks live in ``agent.stage.intent``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.errors import (
    CommitBlockedError,
    ConflictError,
    NotFoundError,
    PreconditionFailedError,
    StoreError,
)
from agent.log import get_logger
from agent.stage.cas import new_write_id, put_fenced
from agent.stage.intent import CommitIntent, StagedCopy, read_intent, read_manifest
from agent.stage.keys import CommitInfo, StageKeys
from agent.stage.manifest import Manifest, summarize_changes
from agent.store.base import ObjectStore, WriteResult
from agent.store.parallel import Parallel, Progress

__all__ = [
    "Commit",
    "Committed",
    "Reupload",
    "remove_staging",
]

log = get_logger(__name__)

_COPY_TRIES = 3
# Server-side copies cost the client no bandwidth, only a round trip each: a wider
# pool than the transfers' (the store's request slots still cap what is in flight).
COPY_POOL_FACTOR = 3


@dataclass(frozen=True)
class Committed:
    """The manifest a commit wrote (or found already written) and its ETag."""

    manifest: Manifest
    etag: str


Reupload = Callable[[str, StagedCopy], str | None]
"""``(path, staged)`` -> the ETag of a fresh staged upload of the local file, or
``None`` when the local file no longer has ``staged.sha256``."""


def remove_staging(store: ObjectStore, keys: StageKeys, session_id: str) -> None:
    """Delete everything under a session's staging prefix."""
    staged = [o.key for o in store.list(keys.staging_prefix(session_id))]
    if staged:
        store.delete_many(staged)


class Commit:
    """Writes and applies commit intents on one stage (the caller holds the stage lock)."""

    def __init__(
        self,
        store: ObjectStore,
        keys: StageKeys,
        *,
        workers: int,
        reupload: Reupload | None = None,
        progress: Callable[[str, int], None] | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.workers = workers
        self.reupload = reupload
        self.progress = progress

    # ----------------------------------------------------------------- settle

    def settle(self) -> tuple[tuple[CommitIntent, str] | None, Committed | None]:
        """Finish an unfinished intent if there is one (roll forward).

        Returns the stage's intent as it now is (``done``, or ``None`` if the stage
        never had one) and, when an unfinished commit was finished here, its result.
        """
        found = read_intent(self.store, self.keys)
        if found is None or found[0].state == "done":
            return found, None
        intent, etag = found
        log.warning(
            "commit_rolled_forward",
            key=self.keys.intent,
            session_id=intent.session_id,
            commit_id=intent.commit_id,
        )
        committed = self.apply(intent, etag)
        return read_intent(self.store, self.keys), committed

    # ------------------------------------------------------------------ begin

    def begin(
        self,
        *,
        session_id: str,
        user: str,
        machine: str,
        base: Manifest,
        base_etag: str | None,
        copies: Mapping[str, StagedCopy],
        deletes: Sequence[str],
        previous: tuple[CommitIntent, str] | None,
        now: datetime | None = None,
    ) -> tuple[CommitIntent, str]:
        """Write the intent (over a finished previous one by CAS) and return it with its ETag.

        ``now``: the store's clock (the lock keeper's), so commit times in the history and
        lock and retention times are read on one clock; the local clock without it.
        """
        if previous is not None and previous[0].state != "done":
            raise CommitBlockedError(
                f"{self.keys.intent} holds an unfinished commit of session "
                f"{previous[0].session_id}; it must be finished first"
            )
        # A base from before content addressing: every version it names (replaced,
        # deleted or kept) is copied into .objects/ once, so the new manifest can say
        # that all its content is there.
        keeps = (
            {}
            if base.content_addressed
            else {
                rel: StagedCopy(size=was.size, sha256=was.sha256, etag=was.etag)
                for rel, was in base.files.items()
            }
        )
        commit_id = uuid.uuid4().hex
        now = now or datetime.now(UTC)
        added, changed, removed, sent = summarize_changes(base, copies, deletes)
        entry = CommitInfo(
            seq=base.seq + 1,
            commit_id=commit_id,
            committed_at=now,
            user=user,
            added=added,
            changed=changed,
            removed=removed,
            bytes=sent,
        )
        intent = CommitIntent(
            state="applying",
            session_id=session_id,
            commit_id=commit_id,
            write_id=new_write_id(),
            user=user,
            machine=machine,
            created_at=now,
            base_manifest_etag=base_etag,
            base_commit_id=base.commit_id,
            copies=dict(copies),
            deletes=sorted(deletes),
            keeps=keeps,
            history_key=entry.key_in(self.keys),
            source="objects",
        )
        written = put_fenced(
            self.store,
            self.keys.intent,
            intent.to_bytes(),
            intent.write_id,
            if_match=previous[1] if previous else None,
            if_none_match=previous is None,
        )
        log.info(
            "commit_intent_written",
            key=self.keys.intent,
            session_id=session_id,
            commit_id=commit_id,
            copies=len(copies),
            deletes=len(deletes),
        )
        return intent, written.etag

    # ------------------------------------------------------------------ apply

    def apply(
        self,
        intent: CommitIntent,
        intent_etag: str,
        current: tuple[Manifest | None, str | None] | None = None,
    ) -> Committed:
        """Finish ``intent`` (idempotent: safe to run again after any failure).

        ``current`` is the stage's manifest and ETag if the caller has just read them
        (a close reads the manifest once); otherwise it is read here.
        """
        now, current_etag = current or read_manifest(self.store, self.keys)
        if now is not None and current_etag and now.commit_id == intent.commit_id:
            log.info("commit_manifest_already_written", commit_id=intent.commit_id)
            committed = Committed(now, current_etag)
            self._record_history(intent, now.to_bytes(), current_etag)
        elif current_etag != intent.base_manifest_etag:
            raise ConflictError(
                f"{self.keys.projekt_id}/{self.keys.stage} holds a manifest that is neither the "
                f"base of the unfinished commit {intent.commit_id} (session {intent.session_id}) "
                "nor its result; nothing was changed. An operator must compare the stage with "
                f"its manifest and remove {self.keys.intent}"
            )
        else:
            committed = self._apply_changes(intent, now or Manifest())
        self._mark_done(intent, intent_etag)
        # An older agent's commit leaves its staging prefix: the intent names the session
        # whose prefix would be deleted, and a crafted one could name someone else's. The
        # session's own discard removes it.
        return committed

    def _apply_changes(self, intent: CommitIntent, base: Manifest) -> Committed:
        order = sorted(intent.copies)
        # (A base before content addressing:) a version is kept right before its copy in
        # the same task, so the copies start at once instead of after every keep.
        only_kept = sorted(set(intent.keeps) - set(intent.copies))
        progress = Progress(
            f"Committing {len(order)} files",
            sum(intent.copies[rel].size for rel in order),
            self.progress,
        )

        def copy_one(rel: str) -> str:
            if rel in intent.keeps:
                self._keep(intent, rel)
            if rel not in intent.copies:
                return ""
            etag = self._copy(intent, rel, intent.copies[rel])
            progress.add(intent.copies[rel].size)
            return etag

        # ``workers = 1`` stays one at a time (serial transfers, as the crash tests use).
        pool = Parallel(self.workers * COPY_POOL_FACTOR if self.workers > 1 else 1)
        etags = pool.map(order + only_kept, copy_one, progress)[: len(order)]
        if intent.deletes:
            self.store.delete_many([self.keys.committed(rel) for rel in intent.deletes])
        manifest = intent.result(base, dict(zip(order, etags, strict=True)))
        assert manifest.write_id is not None
        body = manifest.to_bytes()
        try:
            written = put_fenced(
                self.store,
                self.keys.manifest,
                body,
                manifest.write_id,
                if_match=intent.base_manifest_etag,
                if_none_match=intent.base_manifest_etag is None,
            )
        except PreconditionFailedError as exc:
            raise ConflictError(
                f"someone else committed {self.keys.projekt_id}/{self.keys.stage} during this "
                "commit; the manifest was not overwritten"
            ) from exc
        self._record_history(intent, body, written.etag)
        log.info(
            "session_committed",
            session_id=intent.session_id,
            commit_id=intent.commit_id,
            uploaded=len(order),
            deleted=len(intent.deletes),
            manifest_etag=written.etag,
        )
        return Committed(manifest, written.etag)

    # ---------------------------------------------------------------- history

    def _keep(self, intent: CommitIntent, rel: str) -> None:
        """Copy the committed version of ``rel`` (a base before content addressing) into
        ``.objects/{sha256}``.

        Runs before that committed key is touched, so on a first run the source is
        the version recorded; the copy is pinned to its recorded ETag and its answer
        checked (a store that ignores the pin copies whatever is there: such a copy
        is removed again, never kept under another content's name). On a roll-forward
        the source may already hold the new version: the pin refuses it, and the
        version was kept on the first run. A version without a recorded ETag (a stage
        committed by the old module) is copied unpinned and checked by its sha256
        metadata.
        """
        item = intent.keeps[rel]
        dst = self.keys.version(item.sha256)
        try:
            result = self.store.copy(
                self.keys.committed(rel), dst, if_source_etag=item.etag or None, size=item.size
            )
        except (PreconditionFailedError, NotFoundError):
            if not self._exists(dst):
                log.error("version_not_kept", path=rel, sha256=item.sha256)
            return
        if item.etag:
            if result.etag != item.etag and "-" not in result.etag:
                self.store.delete(dst)  # the store ignored the pin and copied other bytes
                log.error("version_not_kept", path=rel, sha256=item.sha256, found=result.etag)
            return
        got = self._committed_sha256(dst)
        if got is not None and got != item.sha256:  # the unpinned copy met a newer file
            self.store.delete(dst)
            log.error("version_not_kept", path=rel, sha256=item.sha256, found=got)

    def _exists(self, key: str) -> bool:
        try:
            self.store.head(key)
        except NotFoundError:
            return False
        return True

    def _record_history(self, intent: CommitIntent, body: bytes, manifest_etag: str) -> None:
        """Write the commit's manifest into the history (idempotent: same key, same bytes).

        A server-side copy of the manifest just written, pinned to its ETag: the bytes are
        not sent twice (a 100,000-file manifest is 16 MB, 1.3 s on a 100 Mbit/s link).
        A copy refused, or answered with another ETag (a store that ignores the pin, a
        manifest replaced since), is replaced by a PUT of ``body``.
        """
        if intent.history_key is None:
            return
        try:
            try:
                copied = self.store.copy(
                    self.keys.manifest,
                    intent.history_key,
                    if_source_etag=manifest_etag,
                    size=len(body),
                )
                if copied.etag == manifest_etag:
                    return
            except (PreconditionFailedError, NotFoundError):
                pass
            self.store.put_bytes(intent.history_key, body)
        except StoreError as exc:
            # The commit itself is complete; only its history entry is missing.
            log.error("history_not_written", key=intent.history_key, error=str(exc))

    # ------------------------------------------------------------------ copies

    def _copy(self, intent: CommitIntent, rel: str, item: StagedCopy) -> str:
        """Copy one object onto its plain key, pinned to the recorded ETag; the new ETag.

        The answer is checked too: a single-part copy keeps the source's ETag, so
        another ETag means the store copied other bytes (it ignored the pin, or the
        object was replaced). Either way the object is sent again from the local file
        and copied again; without a local file the commit waits (``CommitBlockedError``).
        """
        if intent.source == "objects":
            src = self.keys.version(item.sha256)
        else:
            src = self.keys.staged(intent.session_id, rel)
        dst = self.keys.committed(rel)
        etag = item.etag
        for _ in range(_COPY_TRIES):
            try:
                result = self.store.copy(src, dst, if_source_etag=etag, size=item.size)
            except (PreconditionFailedError, NotFoundError):
                log.warning("object_changed_before_copy", path=rel, key=src, expected_etag=etag)
                already = self._committed_sha256(dst)
                if already == item.sha256 and intent.source == "staging":
                    return self.store.head(dst).etag
            else:
                if result.etag == etag or self._large_copy_holds(dst, result, item):
                    return result.etag
                log.warning(
                    "copy_answer_differs", path=rel, key=src, expected=etag, got=result.etag
                )
            fresh = self.reupload(rel, item) if self.reupload is not None else None
            if fresh is None:
                raise CommitBlockedError(
                    f"the stored content of {rel} ({src}) was changed or removed by someone "
                    "else, and no local file with the recorded content is at hand; the "
                    "commit is kept unfinished and the lock is kept. Run `agent close` (or "
                    "`agent recover --resume`) on the machine of the session "
                    f"{intent.session_id} to send the file again"
                )
            etag = fresh
        raise CommitBlockedError(
            f"the stored content of {rel} kept changing during the commit ({_COPY_TRIES} "
            f"tries); someone is writing to {src}. The lock is kept"
        )

    def _large_copy_holds(self, dst: str, result: WriteResult, item: StagedCopy) -> bool:
        """A copy made in parts, or of an object sent in parts, may get an ETag of its own:
        then the sha256 metadata (copied with the bytes) is what can be checked. Two
        single-part ETags that differ are other bytes, whatever the metadata says."""
        if "-" not in result.etag and "-" not in item.etag:
            return False
        return self._committed_sha256(dst) == item.sha256

    def _committed_sha256(self, key: str) -> str | None:
        try:
            return self.store.head(key).metadata.get("sha256")
        except NotFoundError:
            return None

    def _mark_done(self, intent: CommitIntent, intent_etag: str) -> None:
        # A finished intent is only ever read for its ids: its changes are dropped, so the
        # seed commit of a 100,000-file stage does not leave every later open parsing and
        # checking 100,000 entries (1.5 s).
        done = intent.model_copy(
            update={
                "state": "done",
                "write_id": new_write_id(),
                "copies": {},
                "deletes": [],
                "keeps": {},
                "manifest": None,
            }
        )
        try:
            put_fenced(
                self.store, self.keys.intent, done.to_bytes(), done.write_id, if_match=intent_etag
            )
        except StoreError as exc:
            # The manifest is in, so the commit is complete; the next roll-forward sees
            # its commit id on the manifest and only marks the intent done.
            log.warning("commit_intent_not_marked_done", key=self.keys.intent, error=str(exc))
