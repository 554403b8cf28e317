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

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.exceptions as bexc
import botocore.session
import obstore
import obstore.exceptions as oexc
from botocore.config import Config

if TYPE_CHECKING:
    from obstore.store import ClientConfig

from agent.config import RetryConfig, StoreConfig, StoreLocation, TransferConfig
from agent.errors import (
    AccessDeniedError,
    AgentError,
    BucketMissingError,
    NotFoundError,
    PermanentStoreError,
    PreconditionFailedError,
    StoreError,
    TransientStoreError,
    UnsafeStoreError,
)
from agent.retry import call_with_retries
from agent.store.base import Level, ObjectData, ObjectInfo, ProgressFn, WriteResult

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


def _quote(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


def _unquote(etag: str) -> str:
    """An ETag as we keep it: no quotes, no weak ``W/`` marker."""
    return etag.removeprefix("W/").strip('"')


def _date(response: dict[str, Any]) -> datetime:
    header = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if header:
        with contextlib.suppress(TypeError, ValueError):
            return parsedate_to_datetime(header).astimezone(UTC)
    return datetime.now(UTC)


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
                max_pool_connections=transfer.workers + 4,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                tcp_keepalive=True,
            ),
        )
        self._data = self._make_obstore(session, location, config)

    def _make_obstore(
        self, session: boto3.session.Session, location: StoreLocation, config: StoreConfig
    ) -> Any:
        from obstore.auth.boto3 import Boto3CredentialProvider
        from obstore.store import S3Store as ObjectStoreS3

        options: ClientConfig = {
            "timeout": f"{int(config.read_timeout)}s",
            "connect_timeout": f"{int(config.connect_timeout)}s",
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

    def _translate_data(self, exc: Exception, key: str) -> StoreError:
        """obstore's errors, in the same terms as botocore's."""
        where = f"{key!r} in {self.description}"
        text = str(exc)
        if isinstance(exc, oexc.NotFoundError):
            if "NoSuchBucket" in text:
                return BucketMissingError(
                    f"the bucket {self.bucket!r} does not exist at {self.endpoint or 'AWS'}"
                )
            return NotFoundError(f"no object {where}")
        if isinstance(exc, oexc.PreconditionError | oexc.AlreadyExistsError):
            return PreconditionFailedError(f"the condition on {where} did not hold")
        if isinstance(exc, oexc.PermissionDeniedError | oexc.UnauthenticatedError) or (
            "403 Forbidden" in text or "SignatureDoesNotMatch" in text
        ):
            return AccessDeniedError(
                f"access denied for {where}: check the credentials (AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY or store.profile) and that they may use {self.bucket!r}"
            )
        if "NoSuchBucket" in text:
            return BucketMissingError(
                f"the bucket {self.bucket!r} does not exist at {self.endpoint or 'AWS'}"
            )
        if isinstance(exc, oexc.BaseError) and any(
            marker in text
            for marker in (
                "status code: 5",
                "429",
                "SlowDown",
                "connect",
                "timed out",
                "error sending request",
                "Connection",
                "reset",
                "broken pipe",
            )
        ):
            return TransientStoreError(f"cannot reach {self.endpoint or 'the store'} for {key!r}")
        if isinstance(exc, oexc.BaseError):
            return PermanentStoreError(f"the store refused {where}: {text.splitlines()[0][:300]}")
        if isinstance(exc, OSError):
            raise exc  # a local file problem: the caller translates it
        raise exc

    def _data_call(self, key: str, fn: Callable[[], T]) -> T:
        def once() -> T:
            try:
                return fn()
            except oexc.BaseError as exc:
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

    def _translate_answer(
        self, exc: bexc.ClientError, key: str, where: str, *, conditional: bool
    ) -> AgentError:
        """An error answer from the store, by HTTP status and S3 error code."""
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
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
        return PermanentStoreError(
            f"the store refused {where}: {status} {code} {error.get('Message', '')}"
        )

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
    ) -> WriteResult:
        """Upload a file (obstore; multipart with parallel parts above the threshold)."""
        size = path.stat().st_size
        # obstore sends any key that is not a standard header as ``x-amz-meta-<key>``.
        attributes: dict[str, str] = dict(metadata or {})
        if content_type:
            attributes["Content-Type"] = content_type

        def do() -> WriteResult:
            result = obstore.put(
                self._data,
                key,
                path,
                attributes=attributes or None,
                use_multipart=size > self.transfer.multipart_threshold,
                chunk_size=self.transfer.multipart_chunksize,
                max_concurrency=8,
            )
            if progress is not None:
                progress(size)
            return WriteResult(etag=_unquote(result["e_tag"] or ""), server_time=datetime.now(UTC))

        return self._data_call(key, do)

    def download_file(
        self, key: str, dest: Path, *, progress: ProgressFn | None = None
    ) -> ObjectInfo:
        """Stream an object into ``dest`` (obstore)."""

        def do() -> ObjectInfo:
            written = 0
            try:
                try:
                    result = obstore.get(self._data, key)
                except FileNotFoundError as exc:
                    # obstore raises its 404 as the builtin FileNotFoundError: the object
                    # is missing in the store (exit 7), not a local file problem (issue 9).
                    raise NotFoundError(f"no object {key!r} in {self.description}") from exc
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
            meta = result.meta
            return ObjectInfo(key=key, size=written, etag=_unquote(meta.get("e_tag") or ""))

        return self._data_call(key, do)

    def copy(self, src_key: str, dst_key: str, *, if_source_etag: str | None = None) -> WriteResult:
        """Server-side CopyObject (metadata copied), the source pinned by its ETag if asked.

        boto3, not obstore: obstore's copy cannot send ``x-amz-copy-source-if-match``.
        A copy is idempotent, so a retry after a lost answer does no harm.
        """
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(dst_key),
            "CopySource": {"Bucket": self.bucket, "Key": self._key(src_key)},
        }
        if if_source_etag is not None:
            args["CopySourceIfMatch"] = _quote(if_source_etag)

        def do() -> WriteResult:
            r = self._client.copy_object(**args)
            etag = (r.get("CopyObjectResult") or {}).get("ETag") or ""
            return WriteResult(etag=_unquote(etag), server_time=_date(r))

        return self._call(src_key, do, conditional=if_source_etag is not None)

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
        self._data = None

    def list_level(self, prefix: str) -> Level:
        """One level under ``prefix`` (``Delimiter="/"``), page by page, each page retried."""
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"a level is '' or ends in '/': {prefix!r}")
        strip = len(self.prefix)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self._key(prefix),
            "Delimiter": "/",
        }
        objects: list[ObjectInfo] = []
        subs: list[str] = []
        while True:
            page: dict[str, Any] = self._call(
                prefix, functools.partial(self._client.list_objects_v2, **args)
            )
            objects += [
                ObjectInfo(
                    key=item["Key"][strip:],
                    size=int(item["Size"]),
                    etag=_unquote(item["ETag"]),
                    last_modified=item.get("LastModified"),
                )
                for item in page.get("Contents", [])
            ]
            subs += [p["Prefix"][strip:] for p in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return objects, subs
            token = page.get("NextContinuationToken")
            if not token:
                raise PermanentStoreError(
                    f"the store cut the listing of {prefix!r} in {self.description} short "
                    "(truncated, without a continuation token)"
                )
            args["ContinuationToken"] = token
