"""The bulk data engine of ``agent.store.s3``: obstore, its only importer.

File uploads and downloads and the many small reads of ``get_many`` go through
obstore (the Rust ``object_store`` bindings, credentials fed from the boto3
session), which does not hold the GIL: on 2 cores it moves 1000 small files about
3x faster than boto3 (see the README's benchmark). A large file moves as equal
parts in parallel; every part request takes a slot of the process-wide
``REQUEST_SLOTS``. obstore's errors are translated here, by the status table of
``s3_errors``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import obstore
import obstore.exceptions as oexc

from agent.errors import (
    AgentError,
    NotFoundError,
    ObjectTooLargeError,
    PermanentStoreError,
    PreconditionFailedError,
    TransientStoreError,
)
from agent.retry import call_with_retries
from agent.store.base import (
    ObjectData,
    ObjectInfo,
    ProgressFn,
    WriteResult,
    get_or_none,
    raise_oversized,
)
from agent.store.s3_errors import _DEBUG_MARK, _cut, _obstore_answer, _translate_status, _unquote
from agent.store.s3_parts import (
    _PARTS_PER_FILE,
    REQUEST_SLOTS,
    InOrderDigest,
    _run_parallel,
    part_ranges,
    part_size,
    write_at,
)

if TYPE_CHECKING:
    import boto3
    from obstore.store import ClientConfig

    from agent.config import StoreConfig, StoreLocation
    from agent.store.s3 import S3Store

T = TypeVar("T")

_CHUNK = 1024 * 1024
_O_BINARY: int = getattr(os, "O_BINARY", 0)
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
_NO_WHOLE_REQUEST_LIMIT = timedelta(days=7)


def _is_obstore_error(exc: BaseException) -> bool:
    return isinstance(exc, oexc.BaseError) or (
        isinstance(exc, FileNotFoundError) and exc.errno is None and _DEBUG_MARK in str(exc)
    )


class S3Data:
    """The obstore engine of one ``S3Store``: uploads, downloads, many small reads."""

    def __init__(
        self,
        store: S3Store,
        session: boto3.session.Session,
        location: StoreLocation,
        config: StoreConfig,
    ) -> None:
        self._store = store
        self._data: Any = self._make_obstore(session, location, config)

    def _make_obstore(
        self, session: boto3.session.Session, location: StoreLocation, config: StoreConfig
    ) -> Any:
        from obstore.auth.boto3 import Boto3CredentialProvider
        from obstore.store import S3Store as ObjectStoreS3

        # WAN timeouts (issue 12): a short connect timeout and an idle timeout (no
        # byte for ``read_timeout``); obstore's ``timeout`` bounds the *whole*
        # request, body included, so it is set far out of the way: a 500 MB file
        # over 100 Mbit/s takes 40 s and must not be cut at 30.
        options: ClientConfig = {
            "timeout": _NO_WHOLE_REQUEST_LIMIT,
            "read_timeout": timedelta(seconds=config.read_timeout),
            "connect_timeout": timedelta(seconds=config.connect_timeout),
            "pool_max_idle_per_host": str(self._store.transfer.workers + 4),
        }
        if config.endpoint_url and config.endpoint_url.startswith("http://"):
            options["allow_http"] = True
        if not config.verify_tls:
            options["allow_invalid_certificates"] = True
        kwargs: dict[str, Any] = {
            "region": config.region,
            "virtual_hosted_style_request": config.addressing_style == "virtual",
        }
        if config.endpoint_url:
            kwargs["endpoint"] = config.endpoint_url
        creds = session.get_credentials()
        provider = Boto3CredentialProvider(session) if creds is not None else None
        return ObjectStoreS3(
            location.bucket,
            prefix=self._store.prefix.rstrip("/") or None,
            client_options=options,
            retry_config={"max_retries": 0},
            credential_provider=provider,
            **kwargs,
        )

    def _translate_data(self, exc: Exception, key: str) -> AgentError:
        """obstore's errors, by HTTP status and S3 error code as botocore's are.

        Never by searching the message text: it holds the key and the URL, and a
        permanent error on ``preset.dwg`` is not a connection "reset" (issue 12).
        The status and the error kind are read from the error's structured part.
        """
        where = f"{key!r} in {self._store.description}"
        answer = _obstore_answer(exc)
        if answer.status is not None:
            return _translate_status(
                self._store,
                answer.status,
                answer.code,
                answer.message,
                key,
                where=where,
                conditional=False,
            )
        if answer.http_kind is not None:
            return TransientStoreError(
                f"cannot reach {self._store.endpoint or 'the store'} for {key!r} "
                f"({answer.http_kind.lower()} error)"
            )
        if isinstance(exc, oexc.PreconditionError | oexc.AlreadyExistsError):
            return PreconditionFailedError(f"the condition on {where} did not hold")
        if isinstance(exc, oexc.PermissionDeniedError | oexc.UnauthenticatedError):
            return _translate_status(self._store, 403, "", "", key, where=where, conditional=False)
        if isinstance(exc, oexc.NotFoundError | FileNotFoundError):
            return NotFoundError(f"no object {where}")
        return PermanentStoreError(f"the store refused {where}: {str(exc).splitlines()[0][:300]}")

    def _data_call(self, key: str, fn: Callable[[], T], *, weight: int = 1) -> T:
        """One obstore request (``weight`` slots; 0: ``fn`` takes its own), retried."""

        def once() -> T:
            try:
                if weight == 0:  # ``fn`` takes its own slots
                    return fn()
                with REQUEST_SLOTS.hold(weight):
                    return fn()
            except oexc.BaseError as exc:
                raise self._translate_data(exc, key) from exc
            except FileNotFoundError as exc:
                if not _is_obstore_error(exc):
                    raise  # a local file: the caller translates it
                raise self._translate_data(exc, key) from exc

        return call_with_retries(once, self._store.retry, sleep=self._store._sleep, what=key)

    def get_many(self, keys: Sequence[str], max_bytes: int) -> list[ObjectData | None]:
        """Read many small objects at once (``None`` for each one absent).

        obstore's async GETs on one event loop (in a thread of their own, so a host
        with its own loop is not disturbed): HTTP, signing and parsing happen in
        Rust with the GIL released, a fraction of a botocore call each, which is
        what lets the lock board read 1,000 locks in well under a second. A key
        whose read fails for any other reason is read again through ``get``, with
        its retries and error translation. The answers' server time is the
        store's clock as read once before (plus the time passed since). An object
        over ``max_bytes`` is dropped at its stated size (or after ``max_bytes + 1``
        bytes); one ``ObjectTooLargeError`` names them all once the rest are read.
        """
        if not keys:
            return []
        clock = self._store.server_time()
        started = time.monotonic()
        with (
            REQUEST_SLOTS.hold_up_to(min(len(keys), 64)) as parallel,
            ThreadPoolExecutor(1, thread_name_prefix="pdagent-get-many") as pool,
        ):
            got = pool.submit(asyncio.run, self._get_all(keys, parallel, max_bytes)).result()
        now = clock + timedelta(seconds=time.monotonic() - started)
        out: list[ObjectData | None] = []
        oversized: dict[str, int | None] = {}
        for key, answer in zip(keys, got, strict=True):
            if isinstance(answer, tuple):
                out.append(ObjectData(key=key, body=answer[0], etag=answer[1], server_time=now))
            elif answer is None:
                out.append(None)
            elif isinstance(answer, ObjectTooLargeError):
                out.append(None)
                oversized[key] = answer.size
            else:
                try:
                    get = functools.partial(self._store.get, max_bytes=max_bytes)
                    out.append(get_or_none(get, key))
                except ObjectTooLargeError as exc:
                    out.append(None)
                    oversized[key] = exc.size
        return raise_oversized(out, oversized, max_bytes)

    async def _get_all(
        self, keys: Sequence[str], parallel: int, max_bytes: int
    ) -> list[tuple[bytes, str] | BaseException | None]:
        gate = asyncio.Semaphore(parallel)

        async def one(key: str) -> tuple[bytes, str] | BaseException | None:
            async with gate:
                try:
                    result = await obstore.get_async(self._data, key)
                    size = int(result.meta["size"])
                    if size > max_bytes:
                        return ObjectTooLargeError(key, size, max_bytes)
                    parts: list[bytes] = []
                    got = 0
                    async for chunk in result.stream(min_chunk_size=min(max_bytes + 1, _CHUNK)):
                        parts.append(bytes(chunk))
                        got += len(chunk)
                        if got > max_bytes:
                            return ObjectTooLargeError(key, None, max_bytes)
                except (oexc.NotFoundError, FileNotFoundError):
                    return None
                except (oexc.BaseError, OSError) as exc:  # read again through ``get``
                    return exc
                return b"".join(parts), _unquote(str(result.meta.get("e_tag") or ""))

        return list(await asyncio.gather(*(one(key) for key in keys)))

    def upload_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str | None = None,
        progress: ProgressFn | None = None,
        metadata: Mapping[str, str] | None = None,
        if_none_match: bool = False,
    ) -> WriteResult:
        """Upload a file (obstore; multipart with parallel parts above the threshold).

        ``if_none_match``: a single-part upload is sent with ``If-None-Match: *``; a
        multipart one (which S3 cannot make conditional on every store) asks first
        and is sent only if the key is absent. Either way an existing key is
        ``PreconditionFailedError``, as is our own write whose answer was lost and
        was retried: the caller checks what is there (content-addressed objects).
        """
        size = path.stat().st_size
        # obstore sends any key that is not a standard header as ``x-amz-meta-<key>``.
        attributes: dict[str, str] = dict(metadata or {})
        if content_type:
            attributes["Content-Type"] = content_type

        multipart = size > self._store.transfer.multipart_threshold
        chunk = part_size(size, self._store.transfer.multipart_chunksize)
        parts = min(_PARTS_PER_FILE, len(part_ranges(size, chunk))) if multipart else 1

        if if_none_match and multipart:
            try:
                self._store.head(key)
            except NotFoundError:
                pass
            else:
                where = self._store.description
                raise PreconditionFailedError(f"{key!r} already exists in {where}")

        def do() -> WriteResult:
            # As many parallel parts as request slots are free (at least one): a file
            # alone goes wide, ten files at once share the process-wide slots.
            with REQUEST_SLOTS.hold_up_to(parts) as parallel:
                result = obstore.put(
                    self._data,
                    key,
                    path,
                    attributes=attributes or None,
                    use_multipart=multipart,
                    chunk_size=chunk,
                    max_concurrency=parallel,
                    mode="create" if if_none_match and not multipart else None,
                )
            if progress is not None:
                progress(size)
            return WriteResult(etag=_unquote(result["e_tag"] or ""), server_time=datetime.now(UTC))

        return self._data_call(key, do, weight=0)

    def etag_part_size(self, size: int) -> int | None:
        """The part size ``upload_file`` sends ``size`` bytes in (None: one part)."""
        if size <= self._store.transfer.multipart_threshold:
            return None
        return part_size(size, self._store.transfer.multipart_chunksize)

    def download_file(
        self, key: str, dest: Path, *, progress: ProgressFn | None = None
    ) -> ObjectInfo:
        """Stream an object into ``dest`` (obstore); a large one as parallel ranged GETs.

        The first GET learns the size: a small object is streamed from it whole; of
        one above the multipart threshold it gives the first part only, while the
        other parts are read at once as ranges into ``dest``, each range its own
        retried request pinned to the ETag, so a failure re-reads one range, not the
        file. The answer carries the sha256 of the bytes written: a small object's
        hashed as they are written, a large one's read back in order while the later
        ranges still arrive (``InOrderDigest``), not in a second pass afterwards.
        """

        def first() -> ObjectInfo | tuple[Any, int, str]:
            written = 0
            sha = hashlib.sha256()
            try:
                result = obstore.get(self._data, key)
                meta = result.meta
                size = int(meta["size"])
                if size > self._store.transfer.multipart_threshold:
                    return result, size, str(meta.get("e_tag") or "")
                with dest.open("wb") as out:
                    for chunk in result.stream(min_chunk_size=_CHUNK):
                        out.write(chunk)
                        sha.update(chunk)
                        written += len(chunk)
                        if progress is not None:
                            progress(len(chunk))
            except BaseException:
                if written and progress is not None:
                    progress(-written)
                raise
            if written != size:
                if written and progress is not None:
                    progress(-written)
                raise _cut(key, written, size)
            etag = _unquote(meta.get("e_tag") or "")
            return ObjectInfo(key=key, size=written, etag=etag, sha256=sha.hexdigest())

        got = self._data_call(key, first)
        if isinstance(got, ObjectInfo):
            return got
        answer, size, etag = got
        digest = self._download_ranges(key, dest, size, etag, answer=answer, progress=progress)
        return ObjectInfo(key=key, size=size, etag=_unquote(etag), sha256=digest)

    def _download_ranges(
        self,
        key: str,
        dest: Path,
        size: int,
        etag: str,
        *,
        answer: Any,
        progress: ProgressFn | None,
    ) -> str:
        """Every range of a large object into ``dest`` in parallel; the file's sha256.

        Range 0 is first read from ``answer`` (the first GET's, which goes on past it:
        the rest is dropped), on a retry by a ranged GET like the others.
        """
        ranges = part_ranges(size, part_size(size, self._store.transfer.multipart_chunksize))
        opened = [answer]
        fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _O_BINARY | _O_CLOEXEC, 0o666)
        try:
            os.ftruncate(fd, size)
            digest = InOrderDigest(fd, ranges)

            def read_range(index: int) -> None:
                start, end = ranges[index]

                def do() -> None:
                    got = opened.pop() if index == 0 and opened else None
                    whole = got is not None  # the first GET's answer: more than the range
                    pos = start
                    more = False
                    try:
                        if got is None:
                            got = obstore.get(
                                self._data, key, options={"range": (start, end), "if_match": etag}
                            )
                        for chunk in got.stream(min_chunk_size=_CHUNK):
                            take = memoryview(chunk)[: end - pos]
                            write_at(fd, take, pos)
                            pos += len(take)
                            if progress is not None:
                                progress(len(take))
                            if whole and pos >= end:
                                break  # the rest of the first answer is dropped with it
                            if len(take) < len(chunk):
                                more = True  # past the range: not the answer asked for
                                break
                    except BaseException:
                        if pos > start and progress is not None:
                            progress(start - pos)
                        raise
                    if pos != end or more:
                        if progress is not None:
                            progress(start - pos)
                        got_n = f"more than {end - start}" if more else str(pos - start)
                        raise _cut(key, got_n, end - start, f" (range {start}-{end})")

                self._data_call(key, do)
                digest.written(index)  # outside the request's slot: hashing is local work

            reads = [functools.partial(read_range, i) for i in range(len(ranges))]
            _run_parallel(self._store._per_file, reads)
        finally:
            os.close(fd)
        return digest.hexdigest()

    def close(self) -> None:
        """Drop the obstore store (its connections close with it)."""
        self._data = None
