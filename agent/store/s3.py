"""S3 / R2 backend: the only module that imports boto3 and botocore.

One shared client (thread-safe), path-style addressing, checksums only where an
operation requires them (R2), a connection pool sized to the transfer workers,
botocore's own retries off (tenacity does them, on transient errors only).
Every botocore error is translated here into ``agent.errors``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bexc
from boto3.s3.transfer import TransferConfig as Boto3TransferConfig
from botocore.config import Config

from agent.config import RetryConfig, StoreConfig, StoreLocation, TransferConfig
from agent.errors import (
    AccessDeniedError,
    BucketMissingError,
    NotFoundError,
    PermanentStoreError,
    PreconditionFailedError,
    StoreError,
    TransientStoreError,
)
from agent.retry import call_with_retries
from agent.store.base import ObjectData, ObjectInfo, ProgressFn, WriteResult

__all__ = ["S3Store"]

T = TypeVar("T")

_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "TooManyRequests",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}
_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_CHUNK = 1024 * 1024
_DELETE_BATCH = 1000


def _quote(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


def _unquote(etag: str) -> str:
    return etag.strip('"')


def _date(response: dict[str, Any]) -> datetime:
    header = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if header:
        with contextlib.suppress(TypeError, ValueError):
            return parsedate_to_datetime(header).astimezone(UTC)
    return datetime.now(UTC)


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
        try:
            session = (
                boto3.session.Session(profile_name=config.profile)
                if config.profile
                else boto3.session.Session()
            )
        except bexc.ProfileNotFound as exc:
            raise AccessDeniedError(f"AWS profile {config.profile!r} not found: {exc}") from exc
        self._client: Any = session.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            verify=config.verify_tls,
            config=Config(
                s3={"addressing_style": config.addressing_style},
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=config.connect_timeout,
                read_timeout=config.read_timeout,
                max_pool_connections=transfer.workers + 4,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                tcp_keepalive=True,
            ),
        )
        self._big = Boto3TransferConfig(
            multipart_threshold=transfer.multipart_threshold,
            multipart_chunksize=transfer.multipart_chunksize,
            max_concurrency=4,
            use_threads=True,
        )

    @property
    def description(self) -> str:
        """``s3://bucket/prefix at endpoint`` (never credentials)."""
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def _key(self, key: str) -> str:
        return self.prefix + key

    # ------------------------------------------------------------- errors

    def _translate(self, exc: Exception, key: str, *, conditional: bool = False) -> StoreError:
        where = f"{key!r} in {self.description}"
        if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
            return AccessDeniedError(
                f"no S3 credentials found for {self.description}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or store.profile"
            )
        if isinstance(exc, bexc.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                return TransientStoreError(f"the store answered {status} {code} for {where}")
            if code == "NoSuchBucket" or (not key and status == 404):
                return BucketMissingError(
                    f"the bucket {self.bucket!r} does not exist at "
                    f"{self.endpoint or 'AWS'}: create "
                    "it, or fix store.url"
                )
            if conditional and (
                status in (409, 412) or code in _PRECONDITION_CODES or status == 404
            ):
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
            return PermanentStoreError(
                f"the store refused {where}: {status} {code} {error.get('Message', '')}"
            )
        if isinstance(
            exc,
            bexc.EndpointConnectionError
            | bexc.ConnectTimeoutError
            | bexc.ReadTimeoutError
            | bexc.ConnectionClosedError
            | bexc.ConnectionError
            | bexc.HTTPClientError,
        ):
            return TransientStoreError(
                f"cannot reach {self.endpoint or 'the store'} for {key!r}: {exc}"
            )
        if isinstance(exc, bexc.BotoCoreError):
            return PermanentStoreError(f"S3 client error for {where}: {exc}")
        if isinstance(exc, OSError):
            return TransientStoreError(f"I/O error talking to the store for {where}: {exc}")
        raise exc

    def _call(self, key: str, fn: Callable[[], T], *, conditional: bool = False) -> T:
        def once() -> T:
            try:
                return fn()
            except StoreError:
                raise
            except Exception as exc:
                raise self._translate(exc, key, conditional=conditional) from exc

        return call_with_retries(once, self.retry, sleep=self._sleep, what=key)

    # ----------------------------------------------------------- protocol

    def get(self, key: str) -> ObjectData:
        """Read a small object whole."""

        def do() -> ObjectData:
            r = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            with contextlib.closing(r["Body"]) as body:
                data = body.read()
            return ObjectData(key=key, body=data, etag=_unquote(r["ETag"]), server_time=_date(r))

        return self._call(key, do)

    def head(self, key: str) -> ObjectInfo:
        """Size and ETag."""

        def do() -> ObjectInfo:
            r = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return ObjectInfo(
                key=key,
                size=int(r["ContentLength"]),
                etag=_unquote(r["ETag"]),
                last_modified=r.get("LastModified"),
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
    ) -> WriteResult:
        """Upload a file; multipart (s3transfer) above the threshold."""
        size = path.stat().st_size
        extra = {"ContentType": content_type} if content_type else {}
        sent = 0

        def count(n: int) -> None:
            nonlocal sent
            sent += n
            if progress is not None:
                progress(n)

        def rewind() -> None:
            nonlocal sent
            if sent and progress is not None:
                progress(-sent)
            sent = 0

        if size <= self.transfer.multipart_threshold:

            def small() -> WriteResult:
                rewind()
                with path.open("rb") as fh:
                    data = fh.read()
                r = self._client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, **extra
                )
                count(len(data))
                return WriteResult(etag=_unquote(r["ETag"]), server_time=_date(r))

            return self._call(key, small)

        def big() -> WriteResult:
            rewind()
            self._client.upload_file(
                str(path),
                self.bucket,
                self._key(key),
                ExtraArgs=extra or None,
                Callback=count,
                Config=self._big,
            )
            r = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return WriteResult(etag=_unquote(r["ETag"]), server_time=_date(r))

        return self._call(key, big)

    def download_file(
        self, key: str, dest: Path, *, progress: ProgressFn | None = None
    ) -> ObjectInfo:
        """Stream an object into ``dest``."""

        def do() -> ObjectInfo:
            written = 0
            try:
                r = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
                with contextlib.closing(r["Body"]) as body, dest.open("wb") as out:
                    for chunk in body.iter_chunks(_CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                        if progress is not None:
                            progress(len(chunk))
            except BaseException:
                if written and progress is not None:
                    progress(-written)
                raise
            return ObjectInfo(key=key, size=written, etag=_unquote(r["ETag"]))

        return self._call(key, do)

    def copy(self, src_key: str, dst_key: str) -> WriteResult:
        """Server-side copy (single request; objects up to 5 GiB)."""

        def do() -> WriteResult:
            r = self._client.copy_object(
                Bucket=self.bucket,
                Key=self._key(dst_key),
                CopySource={"Bucket": self.bucket, "Key": self._key(src_key)},
            )
            return WriteResult(etag=_unquote(r["CopyObjectResult"]["ETag"]), server_time=_date(r))

        return self._call(dst_key, do)

    def delete(self, key: str) -> None:
        """Delete an object (missing is fine)."""
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
        """Every object under ``prefix`` (keys relative to the store prefix)."""
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix))
        iterator = iter(pages)
        strip = len(self.prefix)
        while True:
            page = self._call(prefix, lambda: next(iterator, None))
            if page is None:
                return
            for item in page.get("Contents", []):
                yield ObjectInfo(
                    key=item["Key"][strip:],
                    size=int(item["Size"]),
                    etag=_unquote(item["ETag"]),
                    last_modified=item.get("LastModified"),
                )

    def server_time(self) -> datetime:
        """The store's clock, from the ``Date`` of a HEAD on the bucket."""
        return self._call("", lambda: _date(self._client.head_bucket(Bucket=self.bucket)))

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()
