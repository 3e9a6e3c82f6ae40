"""Server settings from the environment and the command line."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def _bool(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _seconds(value: str | None, default: float | None) -> float | None:
    """A retention period; "0" or "never" means keep forever."""
    if value is None or value.strip() == "":
        return default
    if value.strip().lower() in ("0", "never", "forever"):
        return None
    return float(value)


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    storage_url: str = "memory://"
    api_key: str | None = None
    allow_insecure_no_auth: bool = False
    enable_reset: bool = False
    max_body_bytes: int = 1024 * 1024
    max_batch_jobs: int = 10_000
    pool_size: int = 10  # PostgreSQL connections per server process
    processes: int = 1  # server processes sharing the listening socket (processes.py)
    retention_seconds: float | None = 7 * 86400.0  # finished jobs; "0"/"never" keeps forever
    dead_letter_retention_seconds: float | None = None
    graceful_timeout: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"  # or "json"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            host=env.get("OJS_HOST", cls.host),
            port=int(env.get("OJS_PORT", cls.port)),
            storage_url=env.get("OJS_STORAGE") or env.get("DATABASE_URL") or cls.storage_url,
            api_key=env.get("OJS_API_KEY") or None,
            allow_insecure_no_auth=_bool(env.get("OJS_ALLOW_INSECURE_NO_AUTH")),
            enable_reset=_bool(env.get("OJS_ENABLE_RESET")),
            max_body_bytes=int(env.get("OJS_MAX_BODY_BYTES", cls.max_body_bytes)),
            max_batch_jobs=int(env.get("OJS_MAX_BATCH_JOBS", cls.max_batch_jobs)),
            pool_size=int(env.get("OJS_POOL_SIZE", cls.pool_size)),
            processes=int(env.get("OJS_PROCESSES", cls.processes)),
            retention_seconds=_seconds(env.get("OJS_RETENTION_SECONDS"), cls.retention_seconds),
            dead_letter_retention_seconds=_seconds(
                env.get("OJS_DEAD_LETTER_RETENTION_SECONDS"), cls.dead_letter_retention_seconds
            ),
            graceful_timeout=float(env.get("OJS_GRACEFUL_TIMEOUT", cls.graceful_timeout)),
            log_level=env.get("OJS_LOG_LEVEL", cls.log_level).upper(),
            log_format=env.get("OJS_LOG_FORMAT", cls.log_format).lower(),
        )

    def check_bind(self) -> None:
        """Without an API key the server only listens on loopback, unless told otherwise."""
        if self.api_key is None and not self.allow_insecure_no_auth:
            if self.host not in LOOPBACK_HOSTS:
                raise SystemExit(
                    f"refusing to bind {self.host} without OJS_API_KEY; set OJS_API_KEY, "
                    "or OJS_ALLOW_INSECURE_NO_AUTH=true to serve unauthenticated"
                )
