"""Restart crashed actors with backoff; escalate when they keep crashing.

An actor is an ``async def`` that runs until cancelled.  If it raises an
``Exception`` the supervisor logs it, waits (exponential backoff) and starts it
again.  More than ``max_restarts`` crashes within ``window`` seconds means the
fault is not transient: the supervisor raises :class:`ActorEscalation`, which
tears the engine down instead of restarting forever.  Cancellation is a
``BaseException`` and is never caught here.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ojs_trio.engine.errors import BackendUnavailable

log = logging.getLogger("ojs_trio.actors")

Actor = Callable[[], Awaitable[None]]
HEALTHY_RUN = 30.0  # seconds of running that reset an actor's restart backoff


class ActorEscalation(Exception):
    """An actor crashed too often; the engine must stop."""


@dataclass
class ActorStatistics:
    name: str
    restarts: int = 0
    last_error: str | None = None
    running: bool = False


@dataclass
class Supervisor:
    max_restarts: int = 5
    window: float = 60.0
    initial_backoff: float = 0.05
    max_backoff: float = 5.0
    _stats: dict[str, ActorStatistics] = field(default_factory=dict)

    async def supervise(self, name: str, actor: Actor) -> None:
        """Run ``actor`` under supervision until cancelled or escalated."""
        stats = self._stats.setdefault(name, ActorStatistics(name))
        crashes: deque[float] = deque()
        backoff = self.initial_backoff
        while True:
            stats.running = True
            started = trio.current_time()
            try:
                await actor()
            except Exception as exc:
                stats.running = False
                if trio.current_time() - started > HEALTHY_RUN:
                    backoff = self.initial_backoff  # it ran well for a while: start over
                stats.restarts += 1
                stats.last_error = f"{type(exc).__name__}: {exc}"
                if _backend_unavailable(exc):
                    # The backend is down (PostgreSQL restarting, network cut): not the
                    # actor's fault, and no reason to stop the server. Retry with backoff
                    # for as long as it lasts, without counting towards escalation.
                    log.warning(
                        "actor %s: storage unavailable (%s); retrying in %.2fs", name, exc, backoff
                    )
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                now = trio.current_time()
                crashes.append(now)
                while crashes and crashes[0] < now - self.window:
                    crashes.popleft()
                if len(crashes) > self.max_restarts:
                    log.critical(
                        "actor %s crashed %d times in %.0fs; escalating",
                        name,
                        len(crashes),
                        self.window,
                        exc_info=exc,
                    )
                    raise ActorEscalation(f"actor {name!r} keeps crashing") from exc
                log.error("actor %s crashed; restarting in %.2fs", name, backoff, exc_info=exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            stats.running = False
            log.debug("actor %s finished", name)
            return

    def start(self, nursery: trio.Nursery, name: str, actor: Actor) -> None:
        nursery.start_soon(self.supervise, name, actor, name=f"actor:{name}")

    def statistics(self) -> list[ActorStatistics]:
        return list(self._stats.values())


def _backend_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is (or is a group made only of) :class:`BackendUnavailable`."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_backend_unavailable(sub) for sub in exc.exceptions)
    return isinstance(exc, BackendUnavailable)
