"""Listings of ``agent.store.s3``: every page its own retried request, bounded.

A listing is bucket input: it ends with a ``TransientStoreError`` that names the
problem, never an endless loop or a short listing (issues 12 and 19). The pages
are requested through the exact engine (``s3_client``): signed directly, or by
botocore without credentials.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from agent.errors import PermanentStoreError, TransientStoreError
from agent.store.base import Level, ObjectInfo
from agent.store.s3_errors import _unquote
from agent.store.signed import AnswerDeadlineError, AnswerTooLargeError, Page

if TYPE_CHECKING:
    from agent.config import StoreConfig
    from agent.store.s3 import S3Store
    from agent.store.s3_client import S3Client

# A listing may bring this many truncated pages in a row with nothing on them (S3
# can, rarely) before it counts as going nowhere.
_MAX_EMPTY_PAGES = 10
# A continuation token goes back into the URL: longer than this is not a token.
_MAX_TOKEN = 4096


class S3Listing:
    """The listings of one ``S3Store``, page by page through its exact engine."""

    def __init__(self, store: S3Store, engine: S3Client, config: StoreConfig) -> None:
        self._store = store
        self._engine = engine
        self.bucket = store.bucket
        self._page_size = config.list_page_size
        self._list_max_pages = config.list_max_pages
        self._list_deadline = config.list_deadline

    def _key(self, key: str) -> str:
        return self._store._key(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (keys relative to the store prefix), or an error.

        An explicit continuation-token loop, each page its own retried request: a
        transient error on page 2 retries page 2, and a listing that cannot be
        finished raises instead of ending short (issue 12; botocore's paginator,
        once its generator died, silently ended the listing). Bounded (issue 19):
        see ``_pages``.
        """
        strip = len(self._store.prefix)
        for page in self._pages(prefix, None):
            for item in page.objects:
                yield ObjectInfo(
                    key=item.key[strip:],
                    size=item.size,
                    etag=_unquote(item.etag),
                    last_modified=item.last_modified,
                )

    def list_level(self, prefix: str) -> Level:
        """One level under ``prefix`` (``Delimiter="/"``), page by page, each page retried."""
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"a level is '' or ends in '/': {prefix!r}")
        strip = len(self._store.prefix)
        objects: list[ObjectInfo] = []
        subs: list[str] = []
        for page in self._pages(prefix, "/"):
            objects += [
                ObjectInfo(
                    key=item.key[strip:],
                    size=item.size,
                    etag=_unquote(item.etag),
                    last_modified=item.last_modified,
                )
                for item in page.objects
            ]
            subs += [p[strip:] for p in page.prefixes]
        return objects, subs

    def _pages(self, prefix: str, delimiter: str | None) -> Iterator[Page]:
        """Every page of a listing, each its own retried request; bounded (issue 19).

        A listing is bucket input, so it ends with a ``TransientStoreError`` (exit 8)
        that names the problem, never an endless loop: a continuation token seen
        before, a page that does not move past what was listed (or too many empty
        pages in a row), more than ``store.list_max_pages`` pages, a page longer
        than S3 allows (``PAGE_LIMIT``), or ``store.list_deadline`` passed, however
        slowly the answer arrives (no per-byte idle timeout catches a trickle).
        """
        what = f"the listing of {prefix!r} in {self._store.description}"
        deadline = time.monotonic() + self._list_deadline
        tokens: set[bytes] = set()
        token: str | None = None
        last = ""
        empty = 0
        for number in itertools.count(1):
            if number > self._list_max_pages:
                raise TransientStoreError(
                    f"{what} goes on past {self._list_max_pages} pages "
                    "(store.list_max_pages): the store keeps saying there is more; stopped"
                )
            try:
                page = self._page(prefix, delimiter, token, deadline)
            except AnswerDeadlineError as exc:
                raise TransientStoreError(
                    f"{what} took longer than {self._list_deadline:g} s "
                    f"(store.list_deadline) on page {number}; stopped ({exc})"
                ) from exc
            except AnswerTooLargeError as exc:
                raise TransientStoreError(
                    f"{what}: page {number} is longer than any S3 listing page ({exc}); stopped"
                ) from exc
            if len(page.objects) + len(page.prefixes) > self._page_size:
                raise TransientStoreError(
                    f"{what}: page {number} holds {len(page.objects) + len(page.prefixes)} "
                    f"entries, {self._page_size} were asked for; stopped"
                )
            yield page
            if not page.truncated:
                return
            token = self._next_token(prefix, page)
            if len(token) > _MAX_TOKEN:
                raise TransientStoreError(
                    f"{what}: the continuation token after page {number} is "
                    f"{len(token)} characters long; stopped"
                )
            seen = hashlib.sha256(token.encode()).digest()
            if seen in tokens:
                raise TransientStoreError(
                    f"{what}: the store repeated a continuation token after page {number} "
                    "(the listing would go round in circles); stopped"
                )
            tokens.add(seen)
            top = max((*(o.key for o in page.objects), *page.prefixes), default=None)
            if top is None:
                empty += 1
                if empty > _MAX_EMPTY_PAGES:
                    raise TransientStoreError(
                        f"{what} makes no progress: {empty} empty pages in a row, each "
                        "saying there is more; stopped"
                    )
            elif top <= last:
                raise TransientStoreError(
                    f"{what} makes no progress: page {number} lists nothing past "
                    "what the pages before it listed; stopped"
                )
            else:
                last, empty = top, 0
        raise AssertionError("unreachable")  # pragma: no cover

    def _page(self, prefix: str, delimiter: str | None, token: str | None, deadline: float) -> Page:
        """One listing page, its own retried request (signed directly, or by botocore)."""
        if self._engine._signed is not None:
            signed = self._engine._signed
            return self._engine._call(
                prefix,
                lambda: signed.list_page(
                    self._key(prefix),
                    delimiter=delimiter,
                    token=token,
                    max_keys=self._page_size,
                    deadline=deadline,
                ),
            )
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self._key(prefix),
            "MaxKeys": self._page_size,
        }
        if delimiter:
            args["Delimiter"] = delimiter
        if token:
            args["ContinuationToken"] = token
        got: dict[str, Any] = self._engine._call(
            prefix, functools.partial(self._engine._client.list_objects_v2, **args)
        )
        return Page(
            objects=[
                ObjectInfo(
                    key=item["Key"],
                    size=int(item["Size"]),
                    etag=item["ETag"],
                    last_modified=item.get("LastModified"),
                )
                for item in got.get("Contents", [])
            ],
            prefixes=[p["Prefix"] for p in got.get("CommonPrefixes", [])],
            truncated=bool(got.get("IsTruncated")),
            token=got.get("NextContinuationToken"),
        )

    def _next_token(self, prefix: str, page: Page) -> str:
        """A truncated page's continuation token, or an error: never a short listing."""
        if not page.token:
            raise PermanentStoreError(
                f"the store cut the listing of {prefix!r} in {self._store.description} short "
                "(truncated, without a continuation token)"
            )
        return page.token
