"""The exact engine of ``agent.store.s3``: boto3, its only importer.

One shared boto3 client (path-style, checksums only where required as R2 needs,
botocore retries off) carries everything that must be exact: conditional puts of
the lock and the manifest, reads of small objects, heads, server-side copies
(obstore's copy cannot send ``x-amz-copy-source-if-match``), deletes and the
listing pages. Body-less requests take the light signed path (``agent.store.signed``)
when there are credentials. botocore's errors are translated here, by the status
table of ``s3_errors``; retries are tenacity's, on transient errors only.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.exceptions as bexc
import botocore.session
from botocore.config import Config

from agent.errors import (
    AccessDeniedError,
    AgentError,
    ObjectTooLargeError,
    PermanentStoreError,
    PreconditionFailedError,
    StoreError,
    TransientStoreError,
)
from agent.log import get_logger
from agent.retry import call_with_retries
from agent.store.base import ObjectData, ObjectInfo, WriteResult, check_size
from agent.store.s3_errors import _quote, _translate_status, _unquote
from agent.store.s3_parts import REQUEST_SLOTS, _run_parallel, part_ranges, part_size
from agent.store.signed import (
    Answer,
    AnswerCutError,
    AnswerDeadlineError,
    AnswerError,
    AnswerTooLargeError,
    MalformedAnswerError,
    SignedRequests,
    object_base,
)

if TYPE_CHECKING:
    from agent.config import StoreConfig
    from agent.store.s3 import S3Store

T = TypeVar("T")

_DELETE_BATCH = 1000

log = get_logger(__name__)


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


class S3Client:
    """The boto3 engine of one ``S3Store`` (and its signed light path)."""

    def __init__(self, store: S3Store, config: StoreConfig) -> None:
        self._store = store
        self.bucket = store.bucket
        transfer = store.transfer
        self.session = _session(config.profile)
        self._client: Any = self.session.client(
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
        self._signed = self._make_signed(self.session, config)

    def _key(self, key: str) -> str:
        return self._store._key(key)

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
            pool_size=self._store.transfer.workers * 3 + 4,
        )

    def _translate(self, exc: Exception, key: str, *, conditional: bool = False) -> AgentError:
        where = f"{key!r} in {self._store.description}"
        if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
            return AccessDeniedError(
                f"no S3 credentials found for {self._store.description}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or store.profile"
            )
        if isinstance(exc, bexc.ClientError):
            return self._translate_answer(exc, key, where=where, conditional=conditional)
        if isinstance(exc, AnswerError):
            return _translate_status(
                self._store,
                exc.status,
                exc.code,
                exc.message,
                key,
                where=where,
                conditional=conditional,
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
                f"cannot reach {self._store.endpoint or 'the store'} for {key!r}: {exc}"
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
        return _translate_status(
            self._store, status, code, message, key, where=where, conditional=conditional
        )

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

        return call_with_retries(once, self._store.retry, sleep=self._store._sleep, what=key)

    def get(self, key: str, max_bytes: int) -> ObjectData:

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
        if size is None and self._store.transfer.copy_limit < 5 * 1024**3:
            size = self.head(src_key).size
        if size is not None and size > self._store.transfer.copy_limit:
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
                f"the condition on {src_key!r} in {self._store.description} did not hold "
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
        ranges = part_ranges(size, part_size(size, self._store.transfer.copy_chunksize))
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
                self._store._per_file,
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

    def server_time(self) -> datetime:
        """The store's clock, from the ``Date`` of a HEAD on the bucket."""
        return self._call("", lambda: _date(self._client.head_bucket(Bucket=self.bucket)))

    def close(self) -> None:
        """Close the connection pools."""
        self._client.close()
        if self._signed is not None:
            self._signed.close()
