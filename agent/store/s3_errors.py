"""What the S3 store's answers mean, for both engines of ``agent.store.s3``.

An error answer becomes an ``agent.errors`` class by its HTTP status and S3 error
code (``_translate_status``); each engine maps its own exception classes to a status
first (botocore's in ``s3_client``, obstore's in ``s3_data``, so each stays the only
importer of its library). Also here: the reading of an obstore error's structured
part, a cut download, and the ETag's quoting.
"""

from __future__ import annotations

import ast
import contextlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.errors import (
    AccessDeniedError,
    AgentError,
    BucketMissingError,
    NotFoundError,
    PermanentStoreError,
    PreconditionFailedError,
    TransientStoreError,
    UnsafeStoreError,
)

if TYPE_CHECKING:
    from agent.store.s3 import S3Store

_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "TooManyRequests",
    # R2: two conditional writes on one key at once; the loser is told to retry.
    "ConditionalRequestConflict",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}
_PRECONDITION_CODES = {"PreconditionFailed"}


def _quote(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


def _unquote(etag: str) -> str:
    """An ETag as we keep it: no quotes, no weak ``W/`` marker."""
    return etag.removeprefix("W/").strip('"')


@dataclass(frozen=True)
class _ObstoreAnswer:
    """What an obstore error says in its structured part (``Debug source``)."""

    status: int | None = None
    code: str = ""
    message: str = ""
    http_kind: str | None = None


# The structured part of an obstore error is Rust's pretty ``Debug``: one field a
# line. Strings in it (the path, the body) are Debug-escaped, so a key cannot
# forge a line; the URI is percent-encoded. So these anchored lines are facts.
_DEBUG_MARK = "\n\nDebug source:\n"
_STATUS_LINE = re.compile(r"^\s*status: (\d{3}),$", re.MULTILINE)
# ``HttpError`` at the top, or as the ``source`` of a ``Generic`` error (a body cut
# or reset while it streams: ``kind: Interrupted``, issue 19).
_HTTP_KIND = re.compile(r"^\s*(?:source: )?HttpError \{\n\s*kind: (\w+),$", re.MULTILINE)
_BODY_LINE = re.compile(r"^\s*body: Some\(\n\s*(\".*\"),$", re.MULTILINE)
_XML_CODE = re.compile(r"<Code>([A-Za-z0-9_.-]{1,100})</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]{0,300})</Message>")


def _obstore_answer(exc: BaseException) -> _ObstoreAnswer:
    text = str(exc)
    _, mark, debug = text.rpartition(_DEBUG_MARK)
    if not mark:
        return _ObstoreAnswer()
    status = _STATUS_LINE.search(debug)
    if status is None:
        kind = _HTTP_KIND.search(debug)
        return _ObstoreAnswer(http_kind=kind.group(1) if kind else None)
    code = message = ""
    body = _BODY_LINE.search(debug, status.end())
    if body is not None:
        with contextlib.suppress(ValueError, SyntaxError):
            xml = str(ast.literal_eval(body.group(1)))
            if found := _XML_CODE.search(xml):
                code = found.group(1)
            if found := _XML_MESSAGE.search(xml):
                message = found.group(1)
    return _ObstoreAnswer(status=int(status.group(1)), code=code, message=message)


def _cut(key: str, got: int | str, expected: int, where: str = "") -> TransientStoreError:
    """A download answer with another length than it promised: transient, read it again."""
    return TransientStoreError(
        f"the download of {key!r}{where} was cut: {got} of {expected} bytes arrived"
    )


def _translate_status(
    store: S3Store, status: int, code: str, message: str, key: str, *, where: str, conditional: bool
) -> AgentError:
    """An error answer, by HTTP status and S3 error code (both engines come here)."""
    if code == "RequestTimeTooSkewed":
        return PermanentStoreError(
            f"the store refused {where} because this computer's clock is wrong "
            "(RequestTimeTooSkewed): set the clock (enable time synchronisation) and "
            "try again"
        )
    if conditional and (status == 501 or code == "NotImplemented"):
        return UnsafeStoreError(
            f"the store {store.description} does not implement conditional writes "
            f"({status} {code}), so it cannot hold a lock: use a store with "
            "conditional writes (R2, S3, MinIO, SeaweedFS)"
        )
    if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
        return TransientStoreError(f"the store answered {status} {code} for {where}")
    if code == "NoSuchBucket" or (not key and status == 404):
        return BucketMissingError(
            f"the bucket {store.bucket!r} does not exist at "
            f"{store.endpoint or 'AWS'}: create "
            "it, or fix store.url"
        )
    if conditional and (status in (409, 412) or code in _PRECONDITION_CODES or status == 404):
        return PreconditionFailedError(f"the condition on {where} did not hold ({status} {code})")
    if code in _PRECONDITION_CODES or status == 412:
        return PreconditionFailedError(f"the condition on {where} did not hold ({status} {code})")
    if status == 403 or code in _DENIED_CODES:
        return AccessDeniedError(
            f"access denied ({code or status}) for {where}: check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or store.profile) and that they "
            f"may read and write bucket {store.bucket!r}"
        )
    if status == 404 or code in ("NoSuchKey", "NotFound", "404"):
        return NotFoundError(f"no object {where}")
    return PermanentStoreError(f"the store refused {where}: {status} {code} {message}")
