"""Small S3 requests signed and sent directly, without botocore's client machinery.

A botocore client call (parameter validation, serialization, a chain of event
hooks, response parsing) holds the GIL for 2-3 ms. A commit of a thousand changed
files makes two thousand server-side copies, and the lock board reads a thousand
lock bodies: on two cores those calls, not the network, were the cost
(``py-spy --gil``, issue 12). Here a request is built, SigV4-signed by botocore's
own signer, and sent on botocore's own HTTP session class (its TLS bundle,
environment proxies, connect and read timeouts): well under half the work.

Only requests without a body go this way: GET and HEAD of one object, CopyObject
and DELETE. The conditional writes of the lock, the manifest and the intent stay
on the full client. This module is part of the S3 boundary with
``agent.store.s3``, which owns the client and translates every error raised here.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote, unquote_plus, urlencode

import urllib3.exceptions
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.httpsession import URLLib3Session
from botocore.utils import get_environ_proxies
from defusedxml import ElementTree

from agent.store.base import ObjectInfo

__all__ = [
    "DEFAULT_LIMIT",
    "PAGE_LIMIT",
    "Answer",
    "AnswerCutError",
    "AnswerDeadlineError",
    "AnswerError",
    "AnswerTooLargeError",
    "MalformedAnswerError",
    "Page",
    "SignedRequests",
    "object_base",
]

_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
_CODE = re.compile(rb"<Code>([A-Za-z0-9_.-]{1,100})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,300})</Message>")
_ERROR_BODY = re.compile(rb"^\s*(<\?xml[^>]*\?>)?\s*<Error>")
_ETAG = re.compile(rb"<ETag>([^<]{1,200})</ETag>")
_PROBE_KEY = "pdagent-url-probe"
# Bodies are read in slices of this size (or what has arrived, whichever is less).
_SLICE = 64 * 1024
# An answer without a stated limit (copy results, errors) is never longer than this.
DEFAULT_LIMIT = 1024 * 1024
# The longest error body read (the rest is dropped: the code and message come first).
_ERROR_LIMIT = 64 * 1024
# One ListObjectsV2 page: 1,000 keys of at most 1,024 bytes, URL-encoded, with their
# fields, stay under 4 MiB; a longer page is not an S3 answer.
PAGE_LIMIT = 8 * 1024 * 1024


@dataclass(frozen=True)
class Answer:
    """A successful answer: status, headers (lower-case names) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def as_response(self) -> dict[str, Any]:
        """The headers shaped as botocore's ``ResponseMetadata`` (for the Date helper)."""
        return {"ResponseMetadata": {"HTTPHeaders": dict(self.headers)}}


@dataclass
class Page:
    """One page of a ListObjectsV2 answer (keys as the store has them, prefix included)."""

    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    truncated: bool = False
    token: str | None = None


class AnswerTooLargeError(Exception):
    """An answer's body is longer than the caller's limit; reading stopped at limit + 1."""

    def __init__(self, size: int | None, limit: int) -> None:
        told = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        super().__init__(f"the answer is {told}, the limit is {limit}")
        self.size = size
        """The length the answer declared, or ``None`` when it declared none."""
        self.limit = limit


class AnswerDeadlineError(Exception):
    """The caller's deadline passed while the answer was still coming (or before asking)."""


class AnswerCutError(Exception):
    """The body ended before the length its ``Content-Length`` promised."""


class MalformedAnswerError(Exception):
    """A listing answer that is not a ListObjectsV2 page (no XML, entities, bad fields)."""


def _parse_page(body: bytes) -> Page:
    """A ListObjectsV2 answer, requested with ``encoding-type=url``: keys are
    form-encoded (a space is ``+``, a plus ``%2B``, as botocore decodes them), so a
    key with any character survives XML. Anything else is ``MalformedAnswerError``."""
    try:
        return _page_of(ElementTree.fromstring(body))  # no DTD, entity or external reference
    except (ElementTree.ParseError, ValueError, TypeError) as exc:
        raise MalformedAnswerError(f"the listing is not a ListObjectsV2 page: {exc}") from exc


def _page_of(root: Any) -> Page:
    page = Page()
    for child in root:
        tag = child.tag.rpartition("}")[2]
        if tag == "Contents":
            item = {c.tag.rpartition("}")[2]: c.text or "" for c in child}
            modified = None
            if item.get("LastModified"):
                modified = datetime.fromisoformat(item["LastModified"])
            page.objects.append(
                ObjectInfo(
                    key=unquote_plus(item.get("Key", "")),
                    size=int(item.get("Size") or 0),
                    etag=html.unescape(item.get("ETag", "")),
                    last_modified=modified,
                )
            )
        elif tag == "CommonPrefixes":
            for c in child:
                if c.tag.rpartition("}")[2] == "Prefix":
                    page.prefixes.append(unquote_plus(c.text or ""))
        elif tag == "IsTruncated":
            page.truncated = (child.text or "").strip().lower() == "true"
        elif tag == "NextContinuationToken":
            page.token = child.text or None
    return page


class AnswerError(Exception):
    """The store answered with an error: HTTP status and S3 error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code} {message}".strip())
        self.status = status
        self.code = code
        self.message = message


def object_base(client: Any, bucket: str) -> str:
    """``scheme://host[:port]/[bucket/]``: objects' URLs exactly as ``client`` builds them.

    Learned once from a presigned URL (no request is sent), so path or
    virtual-hosted addressing, the endpoint's scheme and port all follow the
    client's own rules.
    """
    url = str(
        client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": _PROBE_KEY}, ExpiresIn=60
        )
    )
    path = url.split("?", 1)[0]
    if not path.endswith("/" + _PROBE_KEY):
        raise ValueError(f"cannot derive the object URL from {path!r}")
    return path[: -len(_PROBE_KEY)]


def _error(status: int, body: bytes) -> AnswerError:
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    return AnswerError(
        status,
        code.group(1).decode() if code else "",
        message.group(1).decode(errors="replace") if message else "",
    )


def _read_body(
    raw: Any, declared: str | None, *, limit: int, deadline: float | None, truncate: bool
) -> bytes:
    """Read an answer's body in slices: at most ``limit + 1`` bytes, until ``deadline``.

    ``truncate``: keep the first ``limit`` bytes and drop the rest instead of raising
    (an error answer's code and message come first).
    """
    size: int | None = None
    if declared is not None and declared.strip().isdigit():
        size = int(declared)
        if size > limit and not truncate:
            raise AnswerTooLargeError(size, limit)
    parts: list[bytes] = []
    got = 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise AnswerDeadlineError(f"the deadline passed after {got} bytes of the answer")
        try:
            piece = raw.read1(min(_SLICE, limit + 1 - got))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise AnswerCutError(f"the answer broke off after {got} bytes: {exc}") from exc
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
        if got > limit:
            if truncate:
                return b"".join(parts)[:limit]
            raise AnswerTooLargeError(size, limit)
    if size is not None and got != size:
        raise AnswerCutError(f"the answer ended after {got} of its {size} bytes")
    return b"".join(parts)


class SignedRequests:
    """Signed body-less requests to one bucket."""

    def __init__(
        self,
        base: str,
        region: str,
        credentials: Any,
        *,
        verify: bool,
        connect_timeout: float,
        read_timeout: float,
        pool_size: int,
    ) -> None:
        self._base = base
        self._region = region
        self._credentials = credentials
        self._http = URLLib3Session(
            verify=verify,
            proxies=get_environ_proxies(base),
            # (connect, read), as botocore itself passes it; the stubs say int only
            timeout=(connect_timeout, read_timeout),  # type: ignore[arg-type]
            max_pool_connections=pool_size,
        )

    def url(self, key: str) -> str:
        """The URL of the object ``key`` (the full key, store prefix included)."""
        return self._base + quote(key, safe="/~")

    def send(
        self,
        method: str,
        key: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        *,
        limit: int = DEFAULT_LIMIT,
        deadline: float | None = None,
    ) -> Answer:
        """One signed request; ``AnswerError`` for an error answer.

        Transport errors are botocore's own exception classes (the caller already
        translates those). A 200 answer whose body is an S3 ``<Error>`` (CopyObject
        can fail after its 200 was sent) is an error. The body is bucket input
        (issue 19): longer than ``limit`` is ``AnswerTooLargeError`` (reading stops
        at ``limit + 1`` bytes), still coming at ``deadline`` (``time.monotonic``)
        is ``AnswerDeadlineError``, shorter than its ``Content-Length`` is
        ``AnswerCutError``.
        """
        url = self.url(key)
        if params:
            url += "?" + urlencode(sorted(params.items()), quote_via=quote, safe="~")
        request = AWSRequest(
            method=method,
            url=url,
            headers={**(headers or {}), "x-amz-content-sha256": _EMPTY_SHA256},
            data=b"",
        )
        request.stream_output = True
        S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self._region).add_auth(
            request
        )
        if deadline is not None and time.monotonic() > deadline:
            raise AnswerDeadlineError("the deadline passed before the request was sent")
        response = self._http.send(request.prepare())
        failed = response.status_code >= 300
        raw = response.raw
        try:
            body = (
                b""
                if method == "HEAD"
                else _read_body(
                    raw,
                    response.headers.get("content-length"),
                    limit=_ERROR_LIMIT if failed else limit,
                    deadline=deadline,
                    truncate=failed,
                )
            )
        except BaseException:
            raw.close()  # never back into the pool half read
            raise
        raw.release_conn()
        if failed or (method == "PUT" and response.status_code == 200 and _ERROR_BODY.match(body)):
            status = 500 if response.status_code < 300 else response.status_code
            raise _error(status, body)
        return Answer(
            status=response.status_code,
            headers={str(k).lower(): str(v) for k, v in response.headers.items()},
            body=body,
        )

    def list_page(
        self,
        prefix: str,
        *,
        delimiter: str | None,
        token: str | None,
        max_keys: int,
        deadline: float | None = None,
    ) -> Page:
        """One ListObjectsV2 page of the bucket under ``prefix`` (the full key prefix)."""
        params = {
            "list-type": "2",
            "prefix": prefix,
            "max-keys": str(max_keys),
            "encoding-type": "url",
        }
        if delimiter:
            params["delimiter"] = delimiter
        if token:
            params["continuation-token"] = token
        got = self.send("GET", "", params=params, limit=PAGE_LIMIT, deadline=deadline)
        return _parse_page(got.body)

    def copy(self, key: str, headers: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
        """CopyObject to ``key``; ``headers`` name the source (unquoted ``bucket/key``)
        and its conditions. The new object's ETag and the answer's headers."""
        sent = dict(headers)
        sent["x-amz-copy-source"] = quote(sent["x-amz-copy-source"], safe="/~")
        got = self.send("PUT", key, sent)
        etag = _ETAG.search(got.body)
        if etag is None:
            raise AnswerError(500, "", "the copy's answer names no ETag")
        return html.unescape(etag.group(1).decode()), got.as_response()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()
