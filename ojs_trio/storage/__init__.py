"""Storage port and adapters."""

from ojs_trio.storage.port import ClaimRequest, EnqueueResult, QueueInfo, Storage

__all__ = ["ClaimRequest", "EnqueueResult", "QueueInfo", "Storage", "open_storage"]


def open_storage(url: str, *, pool_size: int = 10) -> Storage:
    """Build the adapter named by a storage URL: ``memory://`` or ``postgresql://…``."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        from ojs_trio.storage.memory import MemoryStorage

        return MemoryStorage()
    if scheme in ("postgres", "postgresql"):
        # Imported lazily: psycopg is only needed with the [postgres] extra.
        from ojs_trio.storage.postgres.adapter import PostgresStorage

        return PostgresStorage(url, max_size=pool_size)
    raise ValueError(f"unsupported storage URL {url!r}: expected memory:// or postgresql://")
