"""Storage port and adapters."""

from ojs_trio.storage.port import ClaimRequest, EnqueueResult, QueueInfo, Storage

__all__ = ["ClaimRequest", "EnqueueResult", "QueueInfo", "Storage", "open_storage"]


def open_storage(url: str, *, pool_size: int = 10) -> Storage:
    """Build the adapter named by a storage URL: ``memory://``, ``postgresql://…`` or
    ``sqs://…`` (see docs/aws.md)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        from ojs_trio.storage.memory import MemoryStorage

        return MemoryStorage()
    if scheme in ("postgres", "postgresql"):
        # Imported lazily: psycopg is only needed with the [postgres] extra.
        from ojs_trio.storage.postgres.adapter import PostgresStorage

        return PostgresStorage(url, max_size=pool_size)
    if scheme == "sqs":
        # Imported lazily: aiobotocore is only needed with the [sqs] extra.
        from ojs_trio.storage.sqs.adapter import SqsStorage
        from ojs_trio.storage.sqs.client import AwsSettings

        return SqsStorage(AwsSettings.from_url(url))
    raise ValueError(
        f"unsupported storage URL {url!r}: expected memory://, postgresql:// or sqs://"
    )
