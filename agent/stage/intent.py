"""The commit intent (``{projekt_id}/{stage}.commit.json``): its shape, reading and checks.

``CommitIntent`` is what ``Commit.begin`` writes before any committed key is touched
(``agent.stage.commit``); read back from the bucket it is input like any other, so
``read_intent`` checks it (``check_intent``) and refuses one this agent would not
write. ``read_manifest`` reads the committed manifest it is applied over.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.errors import (
    IntentRefusedError,
    InvalidNameError,
    NotFoundError,
    ObjectTooLargeError,
)
from agent.log import get_logger
from agent.names import printable, validate_name, validate_rel_path
from agent.stage.cas import new_write_id
from agent.stage.keys import CommitInfo, StageKeys
from agent.stage.manifest import CONTENT_ADDRESSED, Manifest, ManifestEntry
from agent.store.base import ObjectStore

__all__ = [
    "CommitIntent",
    "IntentFinding",
    "StagedCopy",
    "check_intent",
    "inspect_intent",
    "read_intent",
    "read_manifest",
]

log = get_logger(__name__)


class StagedCopy(BaseModel):
    """One staged object the commit copies: what the journal recorded of it."""

    model_config = ConfigDict(frozen=True)

    size: int
    sha256: str
    etag: str
    executable: bool | None = None
    """The file's executable bit; ``None`` (a platform without one) keeps the base's."""


class CommitIntent(BaseModel):
    """``{projekt_id}/{stage}.commit.json``."""

    model_config = ConfigDict(frozen=True)

    state: Literal["applying", "done"]
    session_id: str
    commit_id: str
    write_id: str
    user: str
    machine: str
    created_at: datetime
    base_manifest_etag: str | None
    base_commit_id: str | None = None
    """The commit the base manifest carries (the new manifest's parent)."""
    manifest: Manifest | None = None
    """The whole new manifest: only in an intent an older agent wrote. This design's
    intent names what changes; the new manifest is the base (the manifest at
    ``base_manifest_etag``) with the copies and deletes applied (``result``)."""
    copies: dict[str, StagedCopy]
    deletes: list[str]
    keeps: dict[str, StagedCopy] = {}
    """Committed versions copied into ``.objects/`` first: only when the base manifest
    predates content addressing (its plain keys are the only copy)."""
    source: Literal["staging", "objects"] = "staging"
    """Where the copies come from: ``objects`` (this design), or the session's staging
    prefix (an intent an older agent wrote, rolled forward as written)."""
    history_key: str | None = None
    """Where the commit's manifest goes in the version history."""

    def to_bytes(self) -> bytes:
        """JSON as stored."""
        exclude = {"manifest"} if self.manifest is None else None
        return self.model_dump_json(exclude=exclude).encode()

    def shas(self) -> set[str]:
        """Every content this commit needs beyond its base (for the collection of objects)."""
        out = {c.sha256 for c in self.copies.values()} | {k.sha256 for k in self.keeps.values()}
        if self.manifest is not None:
            out.update(e.sha256 for e in self.manifest.files.values())
        return out

    def result(self, base: Manifest, etags: Mapping[str, str]) -> Manifest:
        """The manifest this commit writes over ``base``; ``etags``: each copy's answer."""
        if self.manifest is not None:  # an older agent's intent carries it whole
            files = dict(self.manifest.files)
            for rel, etag in etags.items():
                files[rel] = dataclasses.replace(files[rel], etag=etag)
            return self.manifest.model_copy(update={"files": files, "write_id": new_write_id()})
        files = dict(base.files)
        for rel, item in self.copies.items():
            executable = item.executable
            if executable is None:
                was = base.files.get(rel)
                executable = was.executable if was is not None else False
            files[rel] = ManifestEntry(
                size=item.size,
                sha256=item.sha256,
                etag=etags.get(rel, item.etag),
                executable=executable,
            )
        for rel in self.deletes:
            files.pop(rel, None)
        return Manifest.model_construct(
            version=CONTENT_ADDRESSED,
            files=files,
            committed_at=self.created_at,
            committed_by=self.user,
            machine=self.machine,
            session_id=self.session_id,
            commit_id=self.commit_id,
            parent_commit_id=base.commit_id,
            seq=base.seq + 1,
            write_id=new_write_id(),
        )


def read_manifest(store: ObjectStore, keys: StageKeys) -> tuple[Manifest | None, str | None]:
    """The committed manifest and its ETag, ``(None, None)`` for a stage without one."""
    try:
        data = store.get(keys.manifest)
    except NotFoundError:
        return None, None
    return Manifest.parse(data.body, key=keys.manifest), data.etag


def read_intent(store: ObjectStore, keys: StageKeys) -> tuple[CommitIntent, str] | None:
    """The commit intent of the stage and its ETag, ``None`` if no commit ever wrote one.

    The intent is bucket input: it is checked (``check_intent``) before anything acts on
    it, and one this agent would not write (or that is no intent at all: not JSON, the
    wrong shape, over the size limit) is refused (``IntentRefusedError``), left in place
    and never executed.
    """
    found = _examine_intent(store, keys)
    if found is None:
        return None
    intent, etag, problem = found
    if intent is None or problem is not None:
        log.error("commit_intent_refused", key=keys.intent, problem=problem)
        raise IntentRefusedError(
            f"the commit intent {keys.intent} is refused: {problem}. It was not executed and "
            "is left in place; nobody can commit to the stage until an operator compares the "
            "stage with its manifest and removes it"
        )
    return intent, etag


@dataclass(frozen=True)
class IntentFinding:
    """What ``agent lock show`` and ``agent doctor --stage`` report of a stage's intent."""

    state: Literal["none", "finished", "unfinished", "refused"]
    """``unfinished``: a started commit the next lock holder finishes; ``refused``: one
    this agent would not write (never executed, it blocks every commit to the stage)."""
    problem: str | None = None
    """Why it is refused (``check_intent``)."""
    commit_id: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        """For ``--json``."""
        return {"state": self.state, "problem": self.problem, "commit_id": self.commit_id}

    def describe(self) -> str:
        """One line for a user (bucket text escaped)."""
        if self.state == "refused":
            return (
                f"REFUSED: {printable(self.problem or '')} (never executed, left in place; no "
                "commit to the stage is possible until an operator removes it)"
            )
        if self.state == "unfinished":
            return f"unfinished (commit {self.commit_id}; the next lock holder finishes it)"
        return self.state


def inspect_intent(store: ObjectStore, keys: StageKeys) -> IntentFinding:
    """The stage's commit intent, checked as ``read_intent`` checks it, acting on nothing."""
    found = _examine_intent(store, keys)
    if found is None:
        return IntentFinding("none")
    intent, _etag, problem = found
    if intent is None or problem is not None:
        return IntentFinding("refused", problem=problem)
    if intent.state == "done":
        return IntentFinding("finished", commit_id=intent.commit_id)
    return IntentFinding("unfinished", commit_id=intent.commit_id)


def _examine_intent(
    store: ObjectStore, keys: StageKeys
) -> tuple[CommitIntent | None, str, str | None] | None:
    """The stage's intent (``None`` if it is no intent at all), its ETag and what is
    wrong with it (``None``: nothing); ``None`` if the stage has no intent."""
    try:
        data = store.get(keys.intent)
    except NotFoundError:
        return None
    except ObjectTooLargeError as exc:
        told = f"{exc.size} bytes" if exc.size is not None else f"more than {exc.limit} bytes"
        return (
            None,
            "",
            (
                f"it is {told}, over the limit of {exc.limit} bytes for an object read whole "
                "(store.max_manifest_bytes), so it was not read"
            ),
        )
    try:
        intent = CommitIntent.model_validate_json(data.body)
    except ValidationError as exc:
        return None, data.etag, f"it does not parse as a commit intent ({_first_error(exc)})"
    except ValueError as exc:
        return None, data.etag, f"it does not parse as a commit intent ({type(exc).__name__})"
    return intent, data.etag, check_intent(intent, keys)


def _first_error(exc: ValidationError) -> str:
    """Where and why the body is not an intent: pydantic's first error, without the input."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if not errors:
        return "ValidationError"
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f"; {len(errors) - 1} more" if len(errors) > 1 else ""
    return f"{where + ': ' if where else ''}{first['msg']}{more}"


_HEX32 = re.compile(r"[0-9a-f]{32}")


_HEX64 = re.compile(r"[0-9a-f]{64}")


_ETAG = re.compile(r"[0-9A-Za-z\-]{0,80}")


def check_intent(intent: CommitIntent, keys: StageKeys) -> str | None:
    """What is wrong with an intent read from the bucket, or ``None``.

    Every key it makes the agent write lies under its own stage's plain tree, the
    project's ``.objects/``, its own history prefix or its session's staging prefix;
    every path passes the checks of a local name; ids, hashes, sizes and counts have
    the shapes this agent writes and agree with each other.
    """
    return _check_ids(intent) or _check_entries(intent) or _check_history(intent, keys)


def _check_ids(intent: CommitIntent) -> str | None:
    try:
        validate_name("session_id", intent.session_id)
    except InvalidNameError:
        return "its session id is not a safe name"
    if not _HEX32.fullmatch(intent.commit_id):
        return "its commit id is not 32 hex digits"
    if intent.base_commit_id is not None and not _HEX32.fullmatch(intent.base_commit_id):
        return "its base commit id is not 32 hex digits"
    if intent.manifest is not None and intent.manifest.commit_id != intent.commit_id:
        return "the manifest it carries belongs to another commit"
    return None


def _check_entries(intent: CommitIntent) -> str | None:
    entries = [*intent.copies.items(), *intent.keeps.items()]
    if intent.manifest is not None:
        entries += [
            (rel, StagedCopy(size=e.size, sha256=e.sha256, etag=e.etag))
            for rel, e in intent.manifest.files.items()
        ]
    for rel in [*(rel for rel, _ in entries), *intent.deletes]:
        try:
            validate_rel_path(rel)
        except InvalidNameError:
            return f"it names the path {printable(rel)!r}, which is not a safe working-copy path"
    for rel, item in entries:
        if not _HEX64.fullmatch(item.sha256) or item.size < 0 or not _ETAG.fullmatch(item.etag):
            return f"its entry for {printable(rel)!r} has no valid sha256, size or ETag"
    if set(intent.copies) & set(intent.deletes):
        return "it both copies and deletes the same path"
    return None


def _check_history(intent: CommitIntent, keys: StageKeys) -> str | None:
    if intent.history_key is None:
        return None
    info = CommitInfo.parse(keys, intent.history_key)
    if info is None or info.commit_id != intent.commit_id:
        return f"its history key is not this stage's entry for commit {intent.commit_id}"
    if (
        intent.state != "done"  # a finished intent keeps its ids only
        and intent.manifest is None
        and (info.added + info.changed > len(intent.copies) or info.removed > len(intent.deletes))
    ):
        return "the counts in its history key do not agree with its copies and deletes"
    return None
