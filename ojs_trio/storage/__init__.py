"""Storage port and adapters."""

from ojs_trio.storage.port import ClaimRequest, EnqueueResult, QueueInfo, Storage

__all__ = ["ClaimRequest", "EnqueueResult", "QueueInfo", "Storage", "open_storage"]


def open_storage(url: str) -> Storage:
    """Build the adapter named by a storage URL (``memory://``, later ``postgresql://``)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        from ojs_trio.storage.memory import MemoryStorage

        return MemoryStorage()
    raise ValueError(f"unsupported storage URL {url!r}: expected memory://")
