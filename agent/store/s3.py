"""S3 / R2 backend: the only module that imports boto3, botocore and obstore.

Two engines behind one class. boto3 (one shared client, path-style, checksums only
where required as R2 needs, botocore retries off) carries everything that must be
exact: conditional puts of the lock and the manifest, listings, deletes. The bulk
data path (file uploads, downloads, server-side copies) goes through obstore (the
Rust ``object_store`` bindings, credentials fed from the same boto3 session),
which does not hold the GIL: on 2 cores it moves 1000 small files about 3x
faster than boto3 (see the README's benchmark). Retries of both are tenacity's,
on transient errors only; every error is translated here into ``agent.errors``.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import hashlib
import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.exceptions as bexc
import botocore.session
import obstore
import obstore.exceptions as oexc
from botocore.config import Config

from agent.log import get_logger

if TYPE_CHECKING:
    from obstore.store import ClientConfig

from agent.config import RetryConfig, StoreConfig, StoreLocation, TransferConfig
from agent.errors import (
    AccessDeniedError,
    AgentError,
    BucketMissingError,
    NotFoundError,
    ObjectTooLargeError,
    PermanentStoreError,
    PreconditionFailedError,
    StoreError,
    TransientStoreError,
    UnsafeStoreError,
)
from agent.retry import call_with_retries
from agent.store.base import (
    Level,
    ObjectData,
    ObjectInfo,
    ProgressFn,
    WriteResult,
    check_size,
    get_or_none,
    raise_oversized,
)
from agent.store.signed import (
    Answer,
    AnswerCutError,
    AnswerDeadlineError,
    AnswerError,
    AnswerTooLargeError,
    MalformedAnswerError,
    Page,
    SignedRequests,
    object_base,
)

__all__ = ["S3Store"]

T = TypeVar("T")

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
_CHUNK = 1024 * 1024
_DELETE_BATCH = 1000
# R2 and S3 allow 10,000 parts; 9,000 leaves room, and parts stay equal-sized.
_MAX_PARTS = 9000
_NO_WHOLE_REQUEST_LIMIT = timedelta(days=7)
_PARTS_PER_FILE = 8
# A listing may bring this many truncated pages in a row with nothing on them (S3
# can, rarely) before it counts as going nowhere.
_MAX_EMPTY_PAGES = 10
# A continuation token goes back into the URL: longer than this is not a token.
_MAX_TOKEN = 4096

log = get_logger(__name__)


def part_size(size: int, configured: int) -> int:
    """The part size for one file: ``max(configured, ceil(size / 9000))``, all parts equal."""
    return max(configured, -(-size // _MAX_PARTS))


def part_ranges(size: int, part: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of ``part`` bytes (the last one shorter) covering ``size``."""
    return [(start, min(start + part, size)) for start in range(0, size, part)]


class RequestSlots:
    """A weighted semaphore: how many transfer requests are in flight, process-wide.

    One instance per process (``REQUEST_SLOTS``); each file's parallel parts take
    one slot each, so 10 workers x 8 parts never become 80 requests at once.
    Lock and manifest requests do not queue here: a lock renewal must never wait
    behind a slow bulk transfer.
    """

    def __init__(self, capacity: int) -> None:
        self._cond = threading.Condition()
        self._capacity = capacity
        self._used = 0
        self.peak = 0
        """The most slots in use at once so far (tests reset it)."""

    @property
    def capacity(self) -> int:
        """How many slots there are."""
        return self._capacity

    def resize(self, capacity: int) -> None:
        """Set the number of slots (the config's ``transfer.max_requests``)."""
        with self._cond:
            self._capacity = capacity
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold_up_to(self, most: int) -> Iterator[int]:
        """Take between 1 and ``most`` slots, as many as are free; yields how many."""
        with self._cond:
            while self._used >= self._capacity:
                self._cond.wait()
            weight = max(1, min(most, self._capacity - self._used))
            self._used += weight
            self.peak = max(self.peak, self._used)
        try:
            yield weight
        finally:
            with self._cond:
                self._used -= weight
                self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, weight: int = 1) -> Iterator[None]:
        """Take ``weight`` slots (at most all of them) for the duration of a request."""
        with self._cond:
            weight = max(1, min(weight, self._capacity))
            while self._used + weight > self._capacity:
                self._cond.wait()
            self._used += weight
            self.peak = max(self.peak, self._used)
        try:
            yield
        finally:
            with self._cond:
                self._used -= weight
                self._cond.notify_all()


REQUEST_SLOTS = RequestSlots(32)


def _quote(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


def _unquote(etag: str) -> str:
    """An ETag as we keep it: no quotes, no weak ``W/`` marker."""
    return etag.removeprefix("W/").strip('"')


_WARNED_NO_DATE = threading.Event()


def _date(response: dict[str, Any]) -> datetime:
    """The store's clock from the answer's ``Date``; the local clock, with a warning, if none."""
    header = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if header:
        with contextlib.suppress(TypeError, ValueError):
            return parsedate_to_datetime(header).astimezone(UTC)
    if not _WARNED_NO_DATE.is_set():
        _WARNED_NO_DATE.set()
        log.warning(
            "store_sent_no_date",
            detail="the store's answers carry no usable Date header; lock expiry is judged "
            "by this computer's clock, so keep it synchronised",
        )
    return datetime.now(UTC)


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


def _is_obstore_error(exc: BaseException) -> bool:
    return isinstance(exc, oexc.BaseError) or (
        isinstance(exc, FileNotFoundError) and exc.errno is None and _DEBUG_MARK in str(exc)
    )


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


def _head_info(key: str, got: Answer) -> ObjectInfo:
    """An ``ObjectInfo`` from a HEAD answer's headers."""
    modified = None
    if header := got.headers.get("last-modified"):
        with contextlib.suppress(TypeError, ValueError):
            modified = parsedate_to_datetime(header).astimezone(UTC)
    meta = "x-amz-meta-"
    return ObjectInfo(
        key=key,
        size=int(got.headers.get("content-length", "0")),
        etag=_unquote(got.headers.get("etag", "")),
        last_modified=modified,
        metadata={k[len(meta) :]: v for k, v in got.headers.items() if k.startswith(meta)},
    )


def _run_parallel(workers: int, calls: Sequence[Callable[[], None]]) -> None:
    """Run ``calls`` on ``workers`` threads; on a failure cancel the rest and raise it."""
    if len(calls) == 1 or workers == 1:
        for call in calls:
            call()
        return
    with ThreadPoolExecutor(
        max_workers=min(workers, len(calls)), thread_name_prefix="pdagent-part"
    ) as pool:
        futures: list[Future[None]] = [pool.submit(call) for call in calls]
        _done, not_done = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in not_done:
            fut.cancel()
        wait(not_done)
        for fut in futures:
            error = None if fut.cancelled() else fut.exception()
            if error is not None:
                raise error


_LOADER: Any = None
_LOADER_LOCK = threading.Lock()


def _session(profile: str | None) -> boto3.session.Session:
    """A fresh boto3 session (fresh credentials) sharing one model loader per process.

    botocore's loader caches the parsed service models, so creating a client costs
    a few milliseconds instead of ~60 ms of JSON parsing on every open.
    """
    global _LOADER  # noqa: PLW0603 - one cache per process, by design
    core = botocore.session.Session()
    with _LOADER_LOCK:
        if _LOADER is None:
            _LOADER = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _LOADER)
    try:
        return boto3.session.Session(botocore_session=core, profile_name=profile)
    except bexc.ProfileNotFound as exc:
        raise AccessDeniedError(f"AWS profile {profile!r} not found: {exc}") from exc


class S3Store:
    """An ``ObjectStore`` on an S3-compatible bucket (R2, S3, MinIO, SeaweedFS)."""

    def __init__(
        self,
        location: StoreLocation,
        config: StoreConfig,
        *,
        retry: RetryConfig,
        transfer: TransferConfig,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.bucket = location.bucket
        self.prefix = f"{location.prefix.strip('/')}/" if location.prefix.strip("/") else ""
        self.endpoint = config.endpoint_url
        self.retry = retry
        self.transfer = transfer
        self._sleep = sleep
        self._page_size = config.list_page_size
        self._list_max_pages = config.list_max_pages
        self._list_deadline = config.list_deadline
        self._max_small = int(config.max_manifest_bytes)
        REQUEST_SLOTS.resize(transfer.max_requests)
        # Parallel parts of one file; each part takes one of the process-wide slots.
        self._per_file = min(_PARTS_PER_FILE, transfer.max_requests)
        session = _session(config.profile)
        self._client: Any = session.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            verify=config.verify_tls,
            config=Config(
                s3={"addressing_style": config.addressing_style},
                # One retry layer, ours: botocore's ``max_attempts`` counts *retries*
                # (1 would resend once, unseen); ``total_max_attempts=1`` sends once.
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=config.connect_timeout,
                read_timeout=config.read_timeout,
                # Commit copies run COPY_POOL_FACTOR x workers wide (agent.stage.commit).
                max_pool_connections=transfer.workers * 3 + 4,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                tcp_keepalive=True,
            ),
        )
        self._data = self._make_obstore(session, location, config)
        self._signed = self._make_signed(session, config)

    def _make_signed(
        self, session: boto3.session.Session, config: StoreConfig
    ) -> SignedRequests | None:
        """The light path for body-less requests (``agent.store.signed``); none without
        credentials (the client's call then raises the clear "no credentials" error)."""
        credentials = session.get_credentials()
        if credentials is None:
            return None
        return SignedRequests(
            object_base(self._client, self.bucket),
            str(self._client.meta.region_name),
            credentials,
            verify=config.verify_tls,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            pool_size=self.transfer.workers * 3 + 4,
        )

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
            "pool_max_idle_per_host": str(self.transfer.workers + 4),
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
            prefix=self.prefix.rstrip("/") or None,
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
        where = f"{key!r} in {self.description}"
        answer = _obstore_answer(exc)
        if answer.status is not None:
            return self._translate_status(
                answer.status, answer.code, answer.message, key, where, conditional=False
            )
        if answer.http_kind is not None:
            return TransientStoreError(
                f"cannot reach {self.endpoint or 'the store'} for {key!r} "
                f"({answer.http_kind.lower()} error)"
            )
        if isinstance(exc, oexc.PreconditionError | oexc.AlreadyExistsError):
            return PreconditionFailedError(f"the condition on {where} did not hold")
        if isinstance(exc, oexc.PermissionDeniedError | oexc.UnauthenticatedError):
            return self._translate_status(403, "", "", key, where, conditional=False)
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

        return call_with_retries(once, self.retry, sleep=self._sleep, what=key)

    @property
    def description(self) -> str:
        """``s3://bucket/prefix at endpoint`` (never credentials)."""
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def _key(self, key: str) -> str:
        return self.prefix + key

    # ------------------------------------------------------------- errors

    def _translate(self, exc: Exception, key: str, *, conditional: bool = False) -> AgentError:
        where = f"{key!r} in {self.description}"
        if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
            return AccessDeniedError(
                f"no S3 credentials found for {self.description}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or store.profile"
            )
        if isinstance(exc, bexc.ClientError):
            return self._translate_answer(exc, key, where, conditional=conditional)
        if isinstance(exc, AnswerError):
            return self._translate_status(
                exc.status, exc.code, exc.message, key, where, conditional=conditional
            )
        if isinstance(exc, AnswerCutError):
            return TransientStoreError(f"the answer for {where} was cut: {exc}")
        if isinstance(exc, MalformedAnswerError):
            return TransientStoreError(f"the store's answer for {where} is malformed: {exc}")
        if isinstance(exc, AnswerTooLargeError | AnswerDeadlineError):
            raise exc  # not retried: the caller says what it was reading
        if isinstance(
            exc,
            bexc.EndpointConnectionError
            | bexc.ConnectTimeoutError
            | bexc.ReadTimeoutError
            | bexc.ConnectionClosedError
            | bexc.ConnectionError
            | bexc.HTTPClientError,
        ):
            error = TransientStoreError(
                f"cannot reach {self.endpoint or 'the store'} for {key!r}: {exc}"
            )
            # Closed before any answer: most often a pooled keep-alive connection the
            # store dropped while idle (seen after a long multipart upload on SeaweedFS).
            error.retry_at_once = isinstance(exc, bexc.ConnectionClosedError)
            return error
        if isinstance(exc, bexc.BotoCoreError):
            return PermanentStoreError(f"S3 client error for {where}: {exc}")
        if isinstance(exc, OSError):
            return TransientStoreError(f"I/O error talking to the store for {where}: {exc}")
        raise exc

    def _translate_answer(
        self, exc: bexc.ClientError, key: str, where: str, *, conditional: bool
    ) -> AgentError:
        """An error answer from the store, by HTTP status and S3 error code."""
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(error.get("Message", ""))
        return self._translate_status(status, code, message, key, where, conditional=conditional)

    def _translate_status(
        self, status: int, code: str, message: str, key: str, where: str, *, conditional: bool
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
                f"the store {self.description} does not implement conditional writes "
                f"({status} {code}), so it cannot hold a lock: use a store with "
                "conditional writes (R2, S3, MinIO, SeaweedFS)"
            )
        if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            return TransientStoreError(f"the store answered {status} {code} for {where}")
        if code == "NoSuchBucket" or (not key and status == 404):
            return BucketMissingError(
                f"the bucket {self.bucket!r} does not exist at "
                f"{self.endpoint or 'AWS'}: create "
                "it, or fix store.url"
            )
        if conditional and (status in (409, 412) or code in _PRECONDITION_CODES or status == 404):
            return PreconditionFailedError(
                f"the condition on {where} did not hold ({status} {code})"
            )
        if code in _PRECONDITION_CODES or status == 412:
            return PreconditionFailedError(
                f"the condition on {where} did not hold ({status} {code})"
            )
        if status == 403 or code in _DENIED_CODES:
            return AccessDeniedError(
                f"access denied ({code or status}) for {where}: check the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or store.profile) and that they "
                f"may read and write bucket {self.bucket!r}"
            )
        if status == 404 or code in ("NoSuchKey", "NotFound", "404"):
            return NotFoundError(f"no object {where}")
        return PermanentStoreError(f"the store refused {where}: {status} {code} {message}")

    def _call(
        self, key: str, fn: Callable[[], T], *, conditional: bool = False, bulk: bool = False
    ) -> T:
        """One boto3 request, retried; a ``bulk`` one (copies) takes a request slot."""

        def once() -> T:
            try:
                if bulk:
                    with REQUEST_SLOTS.hold():
                        return fn()
                return fn()
            except StoreError:
                raise
            except Exception as exc:
                raise self._translate(exc, key, conditional=conditional) from exc

        return call_with_retries(once, self.retry, sleep=self._sleep, what=key)

    # ----------------------------------------------------------- protocol

    def get(self, key: str, *, max_bytes: int | None = None) -> ObjectData:
        """Read a small object whole: at most ``max_bytes`` (default: the configured
        ``store.max_manifest_bytes``), else ``ObjectTooLargeError``."""
        return self._get(key, self._max_small if max_bytes is None else max_bytes)

    def _get(self, key: str, max_bytes: int) -> ObjectData:

        def do() -> ObjectData:
            if self._signed is not None:
                got = self._signed.send("GET", self._key(key), limit=max_bytes)
                return ObjectData(
                    key=key,
                    body=got.body,
                    etag=_unquote(got.headers.get("etag", "")),
                    server_time=_date(got.as_response()),
                )
            r = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            with contextlib.closing(r["Body"]) as body:
                check_size(key, int(r.get("ContentLength") or 0), max_bytes)
                data = body.read(max_bytes + 1)
            check_size(key, len(data), max_bytes)
            return ObjectData(key=key, body=data, etag=_unquote(r["ETag"]), server_time=_date(r))

        try:
            return self._call(key, do)
        except AnswerTooLargeError as exc:
            raise ObjectTooLargeError(key, exc.size, max_bytes) from exc

    def get_many(
        self, keys: Sequence[str], *, max_bytes: int | None = None
    ) -> list[ObjectData | None]:
        """``_get_many`` with the configured limit unless the caller names one."""
        return self._get_many(keys, self._max_small if max_bytes is None else max_bytes)

    def _get_many(self, keys: Sequence[str], max_bytes: int) -> list[ObjectData | None]:
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
        clock = self.server_time()
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
                    out.append(get_or_none(functools.partial(self.get, max_bytes=max_bytes), key))
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

    def head(self, key: str) -> ObjectInfo:
        """Size and ETag."""

        def do() -> ObjectInfo:
            if self._signed is not None:
                return _head_info(key, self._signed.send("HEAD", self._key(key)))
            r = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return ObjectInfo(
                key=key,
                size=int(r["ContentLength"]),
                etag=_unquote(r["ETag"]),
                last_modified=r.get("LastModified"),
                metadata={str(k).lower(): str(v) for k, v in (r.get("Metadata") or {}).items()},
            )

        return self._call(key, do)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str | None = None,
    ) -> WriteResult:
        """Single-part put, optionally conditional."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = _quote(if_match)
        if content_type:
            args["ContentType"] = content_type

        def do() -> WriteResult:
            r = self._client.put_object(**args)
            return WriteResult(etag=_unquote(r["ETag"]), server_time=_date(r))

        return self._call(key, do, conditional=if_none_match or if_match is not None)

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

        multipart = size > self.transfer.multipart_threshold
        chunk = part_size(size, self.transfer.multipart_chunksize)
        parts = min(_PARTS_PER_FILE, len(part_ranges(size, chunk))) if multipart else 1

        if if_none_match and multipart:
            try:
                self.head(key)
            except NotFoundError:
                pass
            else:
                raise PreconditionFailedError(f"{key!r} already exists in {self.description}")

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
        if size <= self.transfer.multipart_threshold:
            return None
        return part_size(size, self.transfer.multipart_chunksize)

    def download_file(
        self, key: str, dest: Path, *, progress: ProgressFn | None = None
    ) -> ObjectInfo:
        """Stream an object into ``dest`` (obstore); a large one as parallel ranged GETs.

        The first GET learns the size: a small object is streamed from it whole; of
        one above the multipart threshold it gives the first part only, and the rest
        is read as equal ranges into ``dest`` in parallel, each range its own retried
        request pinned to the ETag, so a failure re-reads one range, not the file.
        """

        def first() -> ObjectInfo | tuple[int, str]:
            written = 0
            try:
                result = obstore.get(self._data, key)
                meta = result.meta
                size = int(meta["size"])
                if size > self.transfer.multipart_threshold:
                    self._first_part(key, result, dest, size, progress)
                    return size, str(meta.get("e_tag") or "")
                with dest.open("wb") as out:
                    for chunk in result.stream(min_chunk_size=_CHUNK):
                        out.write(chunk)
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
            return ObjectInfo(key=key, size=written, etag=_unquote(meta.get("e_tag") or ""))

        got = self._data_call(key, first)
        if isinstance(got, ObjectInfo):
            return got
        size, etag = got
        self._download_ranges(key, dest, size, etag, progress)
        return ObjectInfo(key=key, size=size, etag=_unquote(etag))

    def _first_part(
        self, key: str, result: Any, dest: Path, size: int, progress: ProgressFn | None
    ) -> None:
        """Write the first part of a large object from the first GET's answer; drop the rest."""
        part = part_size(size, self.transfer.multipart_chunksize)
        written = 0
        try:
            with dest.open("wb") as out:
                out.truncate(size)
                for chunk in result.stream(min_chunk_size=_CHUNK):
                    take = memoryview(chunk)[: part - written]
                    out.write(take)
                    written += len(take)
                    if progress is not None:
                        progress(len(take))
                    if written >= part:
                        break  # the rest of this answer is dropped with it
        except BaseException:
            if written and progress is not None:
                progress(-written)
            raise
        if written < part:
            if progress is not None:
                progress(-written)
            raise _cut(key, written, part)

    def _download_ranges(
        self, key: str, dest: Path, size: int, etag: str, progress: ProgressFn | None
    ) -> None:
        """All ranges but the first (``download_file``'s first GET wrote that one)."""
        ranges = part_ranges(size, part_size(size, self.transfer.multipart_chunksize))[1:]
        lock = threading.Lock()
        with dest.open("r+b") as out:

            def read_range(start: int, end: int) -> None:
                def do() -> None:
                    pos = start
                    more = False
                    try:
                        result = obstore.get(
                            self._data, key, options={"range": (start, end), "if_match": etag}
                        )
                        for chunk in result.stream(min_chunk_size=_CHUNK):
                            take = memoryview(chunk)[: end - pos]
                            with lock:
                                out.seek(pos)
                                out.write(take)
                            pos += len(take)
                            if progress is not None:
                                progress(len(take))
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
                        got = f"more than {end - start}" if more else str(pos - start)
                        raise _cut(key, got, end - start, f" (range {start}-{end})")

                self._data_call(key, do)

            _run_parallel(
                self._per_file, [functools.partial(read_range, start, end) for start, end in ranges]
            )

    def copy(
        self,
        src_key: str,
        dst_key: str,
        *,
        if_source_etag: str | None = None,
        size: int | None = None,
    ) -> WriteResult:
        """Server-side copy (metadata copied), the source pinned by its ETag if asked.

        Up to ``transfer.copy_limit`` one CopyObject; above it UploadPartCopy in
        parallel equal parts (CopyObject stops at 5 GiB, and one long copy can sit
        silent past a WAN's idle timeout). boto3, not obstore: obstore's copy cannot
        send ``x-amz-copy-source-if-match``. A copy is idempotent, so a retry after
        a lost answer does no harm.
        """
        if size is None and self.transfer.copy_limit < 5 * 1024**3:
            size = self.head(src_key).size
        if size is not None and size > self.transfer.copy_limit:
            return self._copy_parts(src_key, dst_key, if_source_etag, size)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(dst_key),
            "CopySource": {"Bucket": self.bucket, "Key": self._key(src_key)},
        }
        headers = {"x-amz-copy-source": f"{self.bucket}/{self._key(src_key)}"}
        if if_source_etag is not None:
            args["CopySourceIfMatch"] = _quote(if_source_etag)
            headers["x-amz-copy-source-if-match"] = _quote(if_source_etag)

        def do() -> WriteResult:
            if self._signed is not None:
                got = self._signed.copy(self._key(dst_key), headers)
                return WriteResult(etag=_unquote(got[0]), server_time=_date(got[1]))
            r = self._client.copy_object(**args)
            etag = (r.get("CopyObjectResult") or {}).get("ETag") or ""
            return WriteResult(etag=_unquote(etag), server_time=_date(r))

        return self._call(src_key, do, conditional=if_source_etag is not None, bulk=True)

    def _copy_parts(
        self, src_key: str, dst_key: str, if_source_etag: str | None, size: int
    ) -> WriteResult:
        """A multipart copy: the source's metadata and type carried over, parts in parallel."""
        conditional = if_source_etag is not None
        head = self._call(
            src_key, lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(src_key))
        )
        current = _unquote(head["ETag"])
        if if_source_etag is not None and current != _unquote(if_source_etag):
            raise PreconditionFailedError(
                f"the condition on {src_key!r} in {self.description} did not hold "
                f"(its ETag is {current}, expected {if_source_etag})"
            )
        pin = _quote(current)
        create: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(dst_key),
            "Metadata": dict(head.get("Metadata") or {}),
        }
        if head.get("ContentType"):
            create["ContentType"] = head["ContentType"]
        upload_id = self._call(
            dst_key, lambda: self._client.create_multipart_upload(**create)["UploadId"]
        )
        ranges = part_ranges(size, part_size(size, self.transfer.copy_chunksize))
        etags: dict[int, str] = {}

        def copy_part(number: int, start: int, end: int) -> None:
            def do() -> None:
                r = self._client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=self._key(dst_key),
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": self._key(src_key)},
                    CopySourceRange=f"bytes={start}-{end - 1}",
                    CopySourceIfMatch=pin,
                )
                etags[number] = r["CopyPartResult"]["ETag"]

            self._call(src_key, do, conditional=conditional, bulk=True)

        try:
            _run_parallel(
                self._per_file,
                [
                    functools.partial(copy_part, n, start, end)
                    for n, (start, end) in enumerate(ranges, 1)
                ],
            )
            parts = [{"PartNumber": n, "ETag": etags[n]} for n in range(1, len(ranges) + 1)]
            r = self._call(
                dst_key,
                lambda: self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self._key(dst_key),
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                ),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self._key(dst_key), UploadId=upload_id
                )
            raise
        log.info("store_copied_in_parts", key=dst_key, parts=len(ranges), bytes=size)
        return WriteResult(etag=_unquote(r.get("ETag") or ""), server_time=_date(r))

    def delete(self, key: str) -> None:
        """Delete an object (missing is fine)."""
        if self._signed is not None:
            signed = self._signed
            self._call(key, lambda: signed.send("DELETE", self._key(key)))
            return
        self._call(key, lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def delete_many(self, keys: Sequence[str]) -> None:
        """Batched DeleteObjects."""
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]

            def do(batch: Sequence[str] = batch) -> None:
                r = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True},
                )
                errors = r.get("Errors") or []
                if errors:
                    first = errors[0]
                    raise PermanentStoreError(
                        f"{len(errors)} deletes refused, first "
                        f"{first.get('Key')}: {first.get('Code')}"
                    )

            self._call(batch[0], do)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (keys relative to the store prefix), or an error.

        An explicit continuation-token loop, each page its own retried request: a
        transient error on page 2 retries page 2, and a listing that cannot be
        finished raises instead of ending short (issue 12; botocore's paginator,
        once its generator died, silently ended the listing). Bounded (issue 19):
        see ``_pages``.
        """
        strip = len(self.prefix)
        for page in self._pages(prefix, None):
            for item in page.objects:
                yield ObjectInfo(
                    key=item.key[strip:],
                    size=item.size,
                    etag=_unquote(item.etag),
                    last_modified=item.last_modified,
                )

    def server_time(self) -> datetime:
        """The store's clock, from the ``Date`` of a HEAD on the bucket."""
        return self._call("", lambda: _date(self._client.head_bucket(Bucket=self.bucket)))

    def close(self) -> None:
        """Close the connection pools."""
        self._client.close()
        if self._signed is not None:
            self._signed.close()
        self._data = None

    def list_level(self, prefix: str) -> Level:
        """One level under ``prefix`` (``Delimiter="/"``), page by page, each page retried."""
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"a level is '' or ends in '/': {prefix!r}")
        strip = len(self.prefix)
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
        what = f"the listing of {prefix!r} in {self.description}"
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
        if self._signed is not None:
            signed = self._signed
            return self._call(
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
        got: dict[str, Any] = self._call(
            prefix, functools.partial(self._client.list_objects_v2, **args)
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
                f"the store cut the listing of {prefix!r} in {self.description} short "
                "(truncated, without a continuation token)"
            )
        return page.token
