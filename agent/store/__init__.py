"""Object stores: the protocol, the embedded folder store and S3/R2.

``open_store`` picks the backend from the config. The S3 module (the only boto3
importer) is imported lazily so commands that never touch a bucket do not pay
for importing boto3.
"""

from __future__ import annotations

from agent.config import AgentConfig
from agent.store.base import ObjectData, ObjectInfo, ObjectStore, ProgressFn, WriteResult

__all__ = ["ObjectData", "ObjectInfo", "ObjectStore", "ProgressFn", "WriteResult", "open_store"]


def open_store(config: AgentConfig) -> ObjectStore:
    """Build the store the config names (``file://`` folder by default, or ``s3://``)."""
    location = config.store_location()
    if location.scheme == "file":
        from agent.store.local import LocalStore

        assert location.path is not None
        return LocalStore(
            location.path,
            create=not config.store.url,
            multipart_threshold=config.transfer.multipart_threshold,
            max_small=int(config.store.max_manifest_bytes),
        )
    from agent.store.s3 import S3Store

    return S3Store(
        location,
        config.store,
        retry=config.retry,
        transfer=config.transfer,
    )
