"""Enqueue and execution middleware chains (OJS L0-MW, ojs-middleware.md).

Enqueue middleware sees each job before it is stored and may change it, or
return ``None`` to drop it.  Execution middleware wraps a handler call and may
observe, alter or replace the outcome.  Both compose like onion layers: the
first registered is the outermost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from ojs_trio.engine.job import Job

if TYPE_CHECKING:
    from ojs_trio.engine.worker import JobContext

EnqueueNext = Callable[[Job], Awaitable[Job | None]]
EnqueueMiddleware = Callable[[Job, EnqueueNext], Awaitable[Job | None]]
ExecuteNext = Callable[["JobContext"], Awaitable[Any]]
ExecutionMiddleware = Callable[["JobContext", ExecuteNext], Awaitable[Any]]


def build_enqueue_chain(
    middleware: Sequence[EnqueueMiddleware], terminal: EnqueueNext
) -> EnqueueNext:
    chain = terminal
    for mw in reversed(middleware):

        def bind(mw: EnqueueMiddleware, nxt: EnqueueNext) -> EnqueueNext:
            async def call(job: Job) -> Job | None:
                return await mw(job, nxt)

            return call

        chain = bind(mw, chain)
    return chain


def build_execution_chain(
    middleware: Sequence[ExecutionMiddleware], terminal: ExecuteNext
) -> ExecuteNext:
    chain = terminal
    for mw in reversed(middleware):

        def bind(mw: ExecutionMiddleware, nxt: ExecuteNext) -> ExecuteNext:
            async def call(ctx: JobContext) -> Any:
                return await mw(ctx, nxt)

            return call

        chain = bind(mw, chain)
    return chain
