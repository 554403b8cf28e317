"""S3 / R2 backend: ``S3Store``, one class over two engines.

boto3 (``s3_client``, the only boto3 importer) carries everything that must be
exact: conditional puts of the lock and the manifest, small reads, heads, copies,
deletes, and the listing pages (``s3_listing``). The bulk data path (file uploads
and downloads, many small reads at once) goes through obstore (``s3_data``, the
only obstore importer), which does not hold the GIL. Both translate their errors
by one table (``s3_errors``) into ``agent.errors``; large objects move as parts
that share the process-wide request slots (``s3_parts``). This class chooses the
engine for each call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path

from agent.config import RetryConfig, StoreConfig, StoreLocation, TransferConfig
from agent.store.base import Level, ObjectData, ObjectInfo, ProgressFn, WriteResult
from agent.store.s3_client import S3Client
from agent.store.s3_data import S3Data
from agent.store.s3_listing import S3Listing
from agent.store.s3_parts import _PARTS_PER_FILE, REQUEST_SLOTS

__all__ = ["S3Store"]


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
        self._max_small = int(config.max_manifest_bytes)
        REQUEST_SLOTS.resize(transfer.max_requests)
        # Parallel parts of one file; each part takes one of the process-wide slots.
        self._per_file = min(_PARTS_PER_FILE, transfer.max_requests)
        self._exact = S3Client(self, config)
        self._bulk = S3Data(self, self._exact.session, location, config)
        self._lister = S3Listing(self, self._exact, config)

    @property
    def description(self) -> str:
        """``s3://bucket/prefix at endpoint`` (never credentials)."""
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def _key(self, key: str) -> str:
        return self.prefix + key

    # ----------------------------------------------------------- protocol

    def get(self, key: str, *, max_bytes: int | None = None) -> ObjectData:
        """Read a small object whole: at most ``max_bytes`` (default: the configured
        ``store.max_manifest_bytes``), else ``ObjectTooLargeError``."""
        return self._exact.get(key, self._max_small if max_bytes is None else max_bytes)

    def get_many(
        self, keys: Sequence[str], *, max_bytes: int | None = None
    ) -> list[ObjectData | None]:
        """Read many small objects at once (``None`` for each one absent; obstore)."""
        return self._bulk.get_many(keys, self._max_small if max_bytes is None else max_bytes)

    def head(self, key: str) -> ObjectInfo:
        """Size and ETag."""
        return self._exact.head(key)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str | None = None,
    ) -> WriteResult:
        """Single-part put, optionally conditional (boto3)."""
        return self._exact.put_bytes(
            key, data, if_none_match=if_none_match, if_match=if_match, content_type=content_type
        )

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
        """Upload a file (obstore; multipart with parallel parts above the threshold)."""
        return self._bulk.upload_file(
            key,
            path,
            content_type=content_type,
            progress=progress,
            metadata=metadata,
            if_none_match=if_none_match,
        )

    def etag_part_size(self, size: int) -> int | None:
        """The part size ``upload_file`` sends ``size`` bytes in (None: one part)."""
        return self._bulk.etag_part_size(size)

    def download_file(
        self, key: str, dest: Path, *, progress: ProgressFn | None = None
    ) -> ObjectInfo:
        """Stream an object into ``dest`` (obstore); a large one as parallel ranged GETs."""
        return self._bulk.download_file(key, dest, progress=progress)

    def copy(
        self,
        src_key: str,
        dst_key: str,
        *,
        if_source_etag: str | None = None,
        size: int | None = None,
    ) -> WriteResult:
        """Server-side copy (metadata copied), the source pinned by its ETag if asked (boto3)."""
        return self._exact.copy(src_key, dst_key, if_source_etag=if_source_etag, size=size)

    def delete(self, key: str) -> None:
        """Delete an object (missing is fine)."""
        self._exact.delete(key)

    def delete_many(self, keys: Sequence[str]) -> None:
        """Batched DeleteObjects."""
        self._exact.delete_many(keys)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (keys relative to the store prefix), or an error."""
        return self._lister.list(prefix)

    def list_level(self, prefix: str) -> Level:
        """One level under ``prefix`` (``Delimiter="/"``), page by page, each page retried."""
        return self._lister.list_level(prefix)

    def server_time(self) -> datetime:
        """The store's clock, from the ``Date`` of a HEAD on the bucket."""
        return self._exact.server_time()

    def close(self) -> None:
        """Close the connection pools."""
        self._exact.close()
        self._bulk.close()
