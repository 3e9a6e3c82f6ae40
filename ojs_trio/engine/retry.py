"""Retry policy (ojs-retry.md): validation, backoff math, non-retryable matching."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from ojs_trio.engine.errors import InvalidRequest, InvalidRetryPolicy
from ojs_trio.engine.timeutil import format_duration, parse_duration

BackoffStrategy = Literal["none", "constant", "linear", "exponential", "polynomial"]
OnExhaustion = Literal["discard", "dead_letter"]

_STRATEGIES = ("none", "constant", "linear", "exponential", "polynomial")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    initial_interval: float = 1.0  # seconds
    backoff_coefficient: float = 2.0
    max_interval: float = 300.0  # seconds
    jitter: bool = True
    non_retryable_errors: tuple[str, ...] = ()
    on_exhaustion: OnExhaustion = "discard"
    backoff_strategy: BackoffStrategy = "exponential"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = dict(self.extra)
        wire.update(
            max_attempts=self.max_attempts,
            initial_interval=format_duration(self.initial_interval),
            backoff_coefficient=self.backoff_coefficient,
            max_interval=format_duration(self.max_interval),
            jitter=self.jitter,
            non_retryable_errors=list(self.non_retryable_errors),
            on_exhaustion=self.on_exhaustion,
            backoff_strategy=self.backoff_strategy,
        )
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> RetryPolicy:
        """Rebuild a policy that was produced by :meth:`to_wire` (already valid).

        Every job read back from storage carries its policy, and most jobs share a
        handful of policies, so parsed policies are memoised by their wire form.
        """
        try:
            key = tuple(
                (name, type(value), tuple(value) if isinstance(value, list) else value)
                for name, value in raw.items()
            )
            policy = _FROM_WIRE.get(key)
        except TypeError:  # an unhashable unknown field: parse every time
            return parse_retry_policy(raw)
        if policy is None:
            if len(_FROM_WIRE) >= _FROM_WIRE_SIZE:
                _FROM_WIRE.clear()
            policy = _FROM_WIRE[key] = parse_retry_policy(raw)
        return policy


_FROM_WIRE: dict[tuple[Any, ...], RetryPolicy] = {}
_FROM_WIRE_SIZE = 1024


DEFAULT_POLICY = RetryPolicy()


def _duration_field(raw: dict[str, Any], name: str, default: float) -> float:
    # Accept the ISO 8601 form the retry spec mandates and the *_ms integers the
    # HTTP binding's examples use.
    ms_name = name + "_ms"
    if name in raw and raw[name] is not None:
        value = raw[name]
        if not isinstance(value, str):
            raise InvalidRetryPolicy(
                f"retry.{name} must be an ISO 8601 duration string", details={"field": name}
            )
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise InvalidRetryPolicy(
                f"retry.{name}: {exc}", details={"field": name, "value": value}
            ) from None
        return seconds
    if ms_name in raw and raw[ms_name] is not None:
        value = raw[ms_name]
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise InvalidRetryPolicy(
                f"retry.{ms_name} must be a number of milliseconds", details={"field": ms_name}
            )
        return float(value) / 1000.0
    return default


def parse_retry_policy(raw: Any) -> RetryPolicy:
    """Validate a client retry policy (partial override of the default, section 8.1)."""
    if raw is None:
        return DEFAULT_POLICY
    if not isinstance(raw, dict):
        raise InvalidRequest("options.retry must be an object", details={"field": "retry"})
    d = DEFAULT_POLICY
    max_attempts = raw.get("max_attempts", d.max_attempts)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 0:
        raise InvalidRetryPolicy(
            "retry.max_attempts must be a non-negative integer",
            details={"field": "max_attempts", "value": max_attempts},
        )
    initial = _duration_field(raw, "initial_interval", d.initial_interval)
    if initial <= 0:
        raise InvalidRetryPolicy(
            "retry.initial_interval must be greater than zero",
            details={"field": "initial_interval"},
        )
    coefficient = raw.get("backoff_coefficient", d.backoff_coefficient)
    if isinstance(coefficient, bool) or not isinstance(coefficient, int | float):
        raise InvalidRetryPolicy(
            "retry.backoff_coefficient must be a number", details={"field": "backoff_coefficient"}
        )
    if not coefficient >= 1.0:  # also rejects NaN
        raise InvalidRetryPolicy(
            "retry.backoff_coefficient must be >= 1.0",
            details={"field": "backoff_coefficient", "value": coefficient},
        )
    max_interval = _duration_field(raw, "max_interval", max(d.max_interval, initial))
    if max_interval < initial:
        raise InvalidRetryPolicy(
            "retry.max_interval must be >= retry.initial_interval",
            details={"field": "max_interval"},
        )
    jitter = raw.get("jitter", d.jitter)
    if not isinstance(jitter, bool):
        raise InvalidRetryPolicy("retry.jitter must be a boolean", details={"field": "jitter"})
    nre = raw.get("non_retryable_errors", [])
    if not isinstance(nre, list) or not all(isinstance(x, str) for x in nre):
        raise InvalidRetryPolicy(
            "retry.non_retryable_errors must be an array of strings",
            details={"field": "non_retryable_errors"},
        )
    on_exhaustion = raw.get("on_exhaustion", d.on_exhaustion)
    if on_exhaustion not in ("discard", "dead_letter"):
        raise InvalidRetryPolicy(
            "retry.on_exhaustion must be 'discard' or 'dead_letter'",
            details={"field": "on_exhaustion", "value": on_exhaustion},
        )
    strategy = raw.get("backoff_strategy", "exponential")
    if strategy not in _STRATEGIES:
        raise InvalidRetryPolicy(
            f"retry.backoff_strategy must be one of {', '.join(_STRATEGIES)}",
            details={"field": "backoff_strategy", "value": strategy},
        )
    known = {
        "max_attempts",
        "initial_interval",
        "initial_interval_ms",
        "backoff_coefficient",
        "max_interval",
        "max_interval_ms",
        "jitter",
        "non_retryable_errors",
        "on_exhaustion",
        "backoff_strategy",
    }
    return RetryPolicy(
        max_attempts=max_attempts,
        initial_interval=initial,
        backoff_coefficient=float(coefficient),
        max_interval=max_interval,
        jitter=jitter,
        non_retryable_errors=tuple(nre),
        on_exhaustion=on_exhaustion,
        backoff_strategy=strategy,
        extra={k: v for k, v in raw.items() if k not in known},
    )


def raw_delay(policy: RetryPolicy, retry_number: int) -> float:
    """Backoff before retry ``retry_number`` (1 = first retry), capped, without jitter."""
    n = max(1, retry_number)
    base = policy.initial_interval
    match policy.backoff_strategy:
        case "none" | "constant":
            delay = base
        case "linear":
            delay = base * n
        case "polynomial":
            try:
                delay = base * n**policy.backoff_coefficient
            except OverflowError:
                delay = policy.max_interval
        case _:
            # Overflow-safe: past the cap the exact value no longer matters.
            try:
                delay = base * policy.backoff_coefficient ** (n - 1)
            except OverflowError:
                delay = policy.max_interval
    return min(delay, policy.max_interval)


def backoff_delay(
    policy: RetryPolicy, retry_number: int, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry ``retry_number``: cap, jitter in [0.5, 1.5), cap again."""
    delay = raw_delay(policy, retry_number)
    if policy.jitter:
        # RET-06 (ojs-retry.md 5.3): the cap applies again after jitter.
        delay = min(delay * (rng or random).uniform(0.5, 1.5), policy.max_interval)
    return max(0.0, delay)


def matches_non_retryable(patterns: tuple[str, ...] | list[str], error_type: str | None) -> bool:
    """Exact match, or prefix match for entries ending in '.*' (section 6.2)."""
    if not error_type:
        return False
    for pattern in patterns:
        if pattern == error_type:
            return True
        if pattern.endswith(".*") and error_type.startswith(pattern[:-1]):
            return True
        # "Auth.*" also names the family "AuthenticationError", "AuthError", ...:
        # class-style names have no dot, so treat the stem as a name prefix too.
        # The bare stem itself ("auth" for "auth.*") never matches (section 6.2).
        stem = pattern[:-2]
        if (
            pattern.endswith(".*")
            and "." not in error_type
            and len(error_type) > len(stem)
            and error_type.startswith(stem)
        ):
            return True
    return False
