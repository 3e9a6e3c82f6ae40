"""Re-raise a driver's errors as our own, at an adapter's boundary.

Each adapter says which exceptions are its driver's and how to convert one;
this context manager (usable with ``with`` and ``async with``) does the rest.
Our own ``OjsError``\\ s and everything else pass through unchanged, so blocks
can nest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Generic, Literal, TypeVar

from ojs_trio.engine.errors import OjsError

E = TypeVar("E", bound=Exception)


class ErrorMapper(Generic[E]):
    __slots__ = ("_catches", "_convert")

    def __init__(
        self,
        catches: type[E] | tuple[type[E], ...],
        convert: Callable[[E], OjsError],
    ) -> None:
        self._catches = catches
        self._convert = convert

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if isinstance(exc, self._catches):
            raise self._convert(exc) from exc
        return False

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        return self.__exit__(exc_type, exc, tb)


def exception_leaves(exc: BaseException) -> Iterable[BaseException]:
    """The exceptions inside ``exc``, however deeply Trio's nurseries grouped them."""
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from exception_leaves(sub)
    else:
        yield exc
