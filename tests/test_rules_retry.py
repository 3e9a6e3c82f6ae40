"""Retry policy rules (ojs-retry.md sections 2-8 and 11): durations, validation,
backoff math, jitter and non-retryable error matching."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ojs_trio.engine.errors import InvalidRequest, InvalidRetryPolicy
from ojs_trio.engine.retry import (
    DEFAULT_POLICY,
    BackoffStrategy,
    RetryPolicy,
    backoff_delay,
    matches_non_retryable,
    parse_retry_policy,
    raw_delay,
)
from ojs_trio.engine.timeutil import format_duration, parse_duration


class FixedJitter(random.Random):
    """An rng whose ``uniform`` returns a fixed multiplier and records its bounds."""

    def __init__(self, multiplier: float) -> None:
        super().__init__(0)
        self.multiplier = multiplier
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return self.multiplier


def policy(**overrides: Any) -> RetryPolicy:
    fields: dict[str, Any] = {"jitter": False}
    fields.update(overrides)
    return RetryPolicy(**fields)


# --------------------------------------------------------------------------
# ISO 8601 durations (section 4)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("PT1S", 1.0),
        ("PT0.5S", 0.5),
        ("PT5S", 5.0),
        ("PT30S", 30.0),
        ("PT1M", 60.0),
        ("PT5M", 300.0),
        ("PT15M", 900.0),
        ("PT1H", 3600.0),
        ("PT24H", 86400.0),
        ("P1D", 86400.0),
        ("P1DT1H1M1S", 90061.0),
        ("PT1M30S", 90.0),
        ("PT0S", 0.0),
        ("PT1.25S", 1.25),
    ],
)
def test_parse_duration_accepts_iso8601(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "P",
        "PT",
        "P1DT",
        "1S",
        "T1S",
        "PT1",
        "PTS",
        "pt1s",
        "PT-1S",
        "PT+1S",
        "PT1S ",
        " PT1S",
        "PT1.S",
        "PT.5S",
        "PT1S1M",  # components out of order
        "PT1H1H",
        "P1W",  # weeks are not supported
        "1000",
        "5s",
        "PT1,5S",
    ],
)
def test_parse_duration_rejects_malformed_strings(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "seconds,text",
    [
        (0.5, "PT0.5S"),
        (1.0, "PT1S"),
        (5.0, "PT5S"),
        (30.0, "PT30S"),
        (60.0, "PT1M"),
        (90.0, "PT1M30S"),
        (300.0, "PT5M"),
        (3600.0, "PT1H"),
        (5400.0, "PT1H30M"),
        (86400.0, "PT24H"),
        (1.25, "PT1.25S"),
        (0.001, "PT0.001S"),
        (0.0, "PT0S"),
    ],
)
def test_format_duration_uses_the_spec_spelling(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@given(ms=st.integers(min_value=1, max_value=10**9))
def test_format_duration_round_trips_millisecond_values(ms: int) -> None:
    seconds = ms / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


@pytest.mark.parametrize("seconds", [1.5005, 0.0004, 2.0000001], ids=str)
def test_format_duration_round_trips_exactly(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


# --------------------------------------------------------------------------
# Validation (section 11) and defaults (section 8)
# --------------------------------------------------------------------------


def test_default_policy_is_the_spec_default() -> None:
    assert parse_retry_policy(None) == DEFAULT_POLICY
    assert DEFAULT_POLICY.to_wire() == {
        "max_attempts": 3,
        "initial_interval": "PT1S",
        "backoff_coefficient": 2.0,
        "max_interval": "PT5M",
        "jitter": True,
        "non_retryable_errors": [],
        "on_exhaustion": "discard",
        "backoff_strategy": "exponential",
    }


def test_empty_policy_object_is_the_default() -> None:
    assert parse_retry_policy({}) == DEFAULT_POLICY


def test_partial_override_keeps_the_other_defaults() -> None:
    # ojs-retry.md 8.1, verbatim example.
    parsed = parse_retry_policy({"max_attempts": 10, "on_exhaustion": "dead_letter"})
    assert parsed == RetryPolicy(max_attempts=10, on_exhaustion="dead_letter")
    assert parsed.initial_interval == 1.0
    assert parsed.backoff_coefficient == 2.0
    assert parsed.max_interval == 300.0
    assert parsed.jitter is True
    assert parsed.non_retryable_errors == ()


@pytest.mark.parametrize(
    "raw,field,expected",
    [
        ({"max_attempts": 0}, "max_attempts", 0),
        ({"max_attempts": 25}, "max_attempts", 25),
        ({"initial_interval": "PT0.5S"}, "initial_interval", 0.5),
        ({"initial_interval": "PT5M", "max_interval": "PT1H"}, "initial_interval", 300.0),
        ({"initial_interval_ms": 250}, "initial_interval", 0.25),
        ({"backoff_coefficient": 1}, "backoff_coefficient", 1.0),
        ({"backoff_coefficient": 1.5}, "backoff_coefficient", 1.5),
        ({"max_interval": "PT1H"}, "max_interval", 3600.0),
        ({"max_interval_ms": 2000}, "max_interval", 2.0),
        ({"jitter": False}, "jitter", False),
        ({"non_retryable_errors": ["a.b", "auth.*"]}, "non_retryable_errors", ("a.b", "auth.*")),
        ({"on_exhaustion": "dead_letter"}, "on_exhaustion", "dead_letter"),
        ({"backoff_strategy": "linear"}, "backoff_strategy", "linear"),
        ({"backoff_strategy": "polynomial"}, "backoff_strategy", "polynomial"),
    ],
)
def test_valid_overrides(raw: dict[str, Any], field: str, expected: object) -> None:
    assert getattr(parse_retry_policy(raw), field) == expected


def test_initial_interval_above_the_default_cap_raises_the_cap() -> None:
    parsed = parse_retry_policy({"initial_interval": "PT10M"})
    assert parsed.initial_interval == 600.0
    assert parsed.max_interval == 600.0


def test_unknown_policy_fields_are_preserved() -> None:
    parsed = parse_retry_policy({"x_vendor": {"a": 1}})
    assert parsed.to_wire()["x_vendor"] == {"a": 1}


INVALID_POLICIES: list[tuple[str, dict[str, Any], str]] = [
    ("negative max_attempts", {"max_attempts": -1}, "max_attempts"),
    ("fractional max_attempts", {"max_attempts": 2.5}, "max_attempts"),
    ("string max_attempts", {"max_attempts": "3"}, "max_attempts"),
    ("bool max_attempts", {"max_attempts": True}, "max_attempts"),
    ("null max_attempts", {"max_attempts": None}, "max_attempts"),
    ("coefficient below 1", {"backoff_coefficient": 0.5}, "backoff_coefficient"),
    ("coefficient just below 1", {"backoff_coefficient": 0.999}, "backoff_coefficient"),
    ("zero coefficient", {"backoff_coefficient": 0}, "backoff_coefficient"),
    ("negative coefficient", {"backoff_coefficient": -2}, "backoff_coefficient"),
    ("string coefficient", {"backoff_coefficient": "2"}, "backoff_coefficient"),
    ("bool coefficient", {"backoff_coefficient": True}, "backoff_coefficient"),
    ("zero initial_interval", {"initial_interval": "PT0S"}, "initial_interval"),
    ("zero-day initial_interval", {"initial_interval": "P0D"}, "initial_interval"),
    ("malformed initial_interval", {"initial_interval": "5s"}, "initial_interval"),
    ("negative initial_interval", {"initial_interval": "PT-1S"}, "initial_interval"),
    ("numeric initial_interval", {"initial_interval": 5}, "initial_interval"),
    ("empty initial_interval", {"initial_interval": ""}, "initial_interval"),
    ("zero initial_interval_ms", {"initial_interval_ms": 0}, "initial_interval"),
    ("negative initial_interval_ms", {"initial_interval_ms": -5}, "initial_interval"),
    ("string initial_interval_ms", {"initial_interval_ms": "1000"}, "initial_interval_ms"),
    ("max below default initial", {"max_interval": "PT0.5S"}, "max_interval"),
    (
        "max below initial",
        {"initial_interval": "PT10S", "max_interval": "PT5S"},
        "max_interval",
    ),
    ("malformed max_interval", {"max_interval": "five minutes"}, "max_interval"),
    ("max_interval_ms below initial", {"max_interval_ms": 500}, "max_interval"),
    ("string jitter", {"jitter": "true"}, "jitter"),
    ("int jitter", {"jitter": 1}, "jitter"),
    ("null jitter", {"jitter": None}, "jitter"),
    ("string non_retryable_errors", {"non_retryable_errors": "auth.*"}, "non_retryable_errors"),
    ("int in non_retryable_errors", {"non_retryable_errors": [1]}, "non_retryable_errors"),
    ("null in non_retryable_errors", {"non_retryable_errors": ["a", None]}, "non_retryable_errors"),
    ("object non_retryable_errors", {"non_retryable_errors": {"a": 1}}, "non_retryable_errors"),
    ("unknown on_exhaustion", {"on_exhaustion": "drop"}, "on_exhaustion"),
    ("uppercase on_exhaustion", {"on_exhaustion": "DISCARD"}, "on_exhaustion"),
    ("numeric on_exhaustion", {"on_exhaustion": 1}, "on_exhaustion"),
    ("unknown backoff_strategy", {"backoff_strategy": "fibonacci"}, "backoff_strategy"),
]


@pytest.mark.parametrize(
    "raw,field", [case[1:] for case in INVALID_POLICIES], ids=[c[0] for c in INVALID_POLICIES]
)
def test_invalid_policy_is_rejected_with_422_naming_the_field(
    raw: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRetryPolicy) as info:
        parse_retry_policy(raw)
    err = info.value
    assert err.http_status == 422
    assert err.code == "invalid_retry_policy"
    assert err.details["field"] == field
    assert field in err.message
    assert err.to_wire()["details"]["field"] == field


@pytest.mark.parametrize("raw", [[], "PT1S", 3, True], ids=repr)
def test_retry_that_is_not_an_object_is_a_400(raw: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_retry_policy(raw)
    assert info.value.http_status == 400
    assert info.value.details["field"] == "retry"


@pytest.mark.parametrize(
    "raw",
    [{"backoff_coefficient": math.nan}, {"initial_interval_ms": math.nan}],
    ids=["coefficient", "initial_interval_ms"],
)
def test_nan_numbers_are_rejected(raw: dict[str, Any]) -> None:
    with pytest.raises(InvalidRetryPolicy):
        parse_retry_policy(raw)


def test_policy_round_trips_through_its_wire_form() -> None:
    original = parse_retry_policy(
        {
            "max_attempts": 7,
            "initial_interval": "PT0.25S",
            "backoff_coefficient": 3,
            "max_interval": "PT1H",
            "jitter": False,
            "non_retryable_errors": ["auth.*"],
            "on_exhaustion": "dead_letter",
            "backoff_strategy": "polynomial",
        }
    )
    assert RetryPolicy.from_wire(original.to_wire()) == original


# --------------------------------------------------------------------------
# Backoff math (section 3)
# --------------------------------------------------------------------------

BACKOFF_TABLES: list[tuple[str, RetryPolicy, list[float]]] = [
    # 3.1: constant, coefficient ignored
    ("none", policy(backoff_strategy="none", initial_interval=5.0), [5, 5, 5, 5]),
    (
        "constant",
        policy(backoff_strategy="constant", initial_interval=5.0, backoff_coefficient=3.0),
        [5, 5, 5, 5],
    ),
    # 3.2: linear, coefficient ignored
    (
        "linear",
        policy(backoff_strategy="linear", initial_interval=5.0, backoff_coefficient=3.0),
        [5, 10, 15, 20],
    ),
    # 3.3: exponential, PT1S x2, capped at PT5M on retry 10
    (
        "exponential",
        policy(initial_interval=1.0, backoff_coefficient=2.0, max_interval=300.0),
        [1, 2, 4, 8, 16, 32, 64, 128, 256, 300],
    ),
    (
        "exponential coefficient 1 is constant",
        policy(initial_interval=2.0, backoff_coefficient=1.0),
        [2, 2, 2, 2],
    ),
    # 3.4: polynomial, PT1S ^4, capped at PT5M on retry 5
    (
        "polynomial",
        policy(backoff_strategy="polynomial", initial_interval=1.0, backoff_coefficient=4.0),
        [1, 16, 81, 256, 300],
    ),
    # 3.5: the cap applies to every strategy
    (
        "linear capped",
        policy(backoff_strategy="linear", initial_interval=5.0, max_interval=12.0),
        [5, 10, 12, 12],
    ),
    (
        "exponential small cap",
        policy(initial_interval=10.0, max_interval=30.0),
        [10, 20, 30, 30],
    ),
]


@pytest.mark.parametrize(
    "retry_policy,expected",
    [case[1:] for case in BACKOFF_TABLES],
    ids=[case[0] for case in BACKOFF_TABLES],
)
def test_backoff_table(retry_policy: RetryPolicy, expected: list[float]) -> None:
    got = [raw_delay(retry_policy, n) for n in range(1, len(expected) + 1)]
    assert got == pytest.approx(expected)
    # jitter off: the delay is exactly the capped raw delay
    assert [backoff_delay(retry_policy, n) for n in range(1, len(expected) + 1)] == got


def test_retry_number_below_one_is_treated_as_the_first_retry() -> None:
    p = policy(initial_interval=3.0)
    assert raw_delay(p, 0) == raw_delay(p, 1) == 3.0


def test_max_interval_cap_is_applied_before_jitter() -> None:
    # retry 10 of the exponential example: raw 512 s, capped 300 s.
    p = policy(jitter=True, initial_interval=1.0, max_interval=300.0)
    low = FixedJitter(0.5)
    assert backoff_delay(p, 10, low) == pytest.approx(150.0)  # 0.5 * 300, not 0.5 * 512
    assert low.calls == [(0.5, 1.5)]


def test_jitter_never_pushes_the_delay_past_max_interval() -> None:
    p = policy(jitter=True, initial_interval=1.0, max_interval=300.0)
    assert backoff_delay(p, 10, FixedJitter(1.4)) <= 300.0


STRATEGIES: list[BackoffStrategy] = ["none", "constant", "linear", "exponential", "polynomial"]


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**64 - 1),
    retry_number=st.integers(min_value=1, max_value=60),
    initial=st.floats(min_value=0.001, max_value=3600.0),
    coefficient=st.floats(min_value=1.0, max_value=4.0),
    cap_factor=st.floats(min_value=1.0, max_value=1000.0),
    strategy=st.sampled_from(STRATEGIES),
)
def test_jitter_stays_within_half_and_one_and_a_half_of_the_capped_delay(
    seed: int,
    retry_number: int,
    initial: float,
    coefficient: float,
    cap_factor: float,
    strategy: BackoffStrategy,
) -> None:
    p = RetryPolicy(
        initial_interval=initial,
        backoff_coefficient=coefficient,
        max_interval=initial * cap_factor,
        jitter=True,
        backoff_strategy=strategy,
    )
    capped = raw_delay(p, retry_number)
    assert initial * (1 - 1e-12) <= capped <= p.max_interval
    delay = backoff_delay(p, retry_number, random.Random(seed))
    assert 0.5 * capped <= delay < 1.5 * capped


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    p = policy(jitter=True)
    first = [backoff_delay(p, n, random.Random(42)) for n in range(1, 6)]
    second = [backoff_delay(p, n, random.Random(42)) for n in range(1, 6)]
    assert first == second


def test_jitter_actually_varies_the_delay() -> None:
    p = policy(jitter=True, initial_interval=10.0)
    rng = random.Random(7)
    assert len({backoff_delay(p, 1, rng) for _ in range(20)}) > 1


HUGE_ATTEMPTS = [10**3, 10**6, 10**9, 2**63, 10**30]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("attempt", HUGE_ATTEMPTS, ids=lambda n: f"attempt={n:.0e}")
def test_huge_attempt_numbers_do_not_overflow(strategy: BackoffStrategy, attempt: int) -> None:
    p = policy(backoff_strategy=strategy, backoff_coefficient=2.0, max_interval=300.0)
    delay = raw_delay(p, attempt)
    assert math.isfinite(delay)
    assert 0 < delay <= 300.0
    jittered = backoff_delay(policy(backoff_strategy=strategy, jitter=True), attempt)
    assert math.isfinite(jittered)


@pytest.mark.parametrize("coefficient", [2.0, 10.0, 1e6])
def test_exponential_overflow_caps_at_max_interval(coefficient: float) -> None:
    p = policy(backoff_coefficient=coefficient, max_interval=60.0)
    assert raw_delay(p, 100_000) == 60.0


@pytest.mark.parametrize("retry_number,coefficient", [(3, 1000.0), (10**6, 60.0)])
def test_polynomial_overflow_caps_at_max_interval(retry_number: int, coefficient: float) -> None:
    p = policy(backoff_strategy="polynomial", backoff_coefficient=coefficient, max_interval=60.0)
    assert raw_delay(p, retry_number) == 60.0


# --------------------------------------------------------------------------
# Non-retryable matching (section 6.2)
# --------------------------------------------------------------------------

MATCH_TABLE: list[tuple[tuple[str, ...], str | None, bool]] = [
    # the spec's own example table
    (("validation.payload_invalid", "auth.*"), "validation.payload_invalid", True),
    (("validation.payload_invalid", "auth.*"), "validation.schema_error", False),
    (("validation.payload_invalid", "auth.*"), "auth.token_expired", True),
    (("validation.payload_invalid", "auth.*"), "auth.forbidden", True),
    (("validation.payload_invalid", "auth.*"), "external.auth.failure", False),
    # exact matching
    (("ValidationError",), "ValidationError", True),
    (("ValidationError",), "validationerror", False),
    (("ValidationError",), "ValidationErrorX", False),
    (("auth.token_expired",), "auth.token_expired.deep", False),
    # prefix matching
    (("auth.*",), "auth.token.expired", True),
    (("external.stripe.*",), "external.stripe.card_declined", True),
    (("external.stripe.*",), "external.paypal.card_declined", False),
    # class-style families: "Auth.*" names AuthenticationError, Auth.TokenExpired, ...
    (("Auth.*",), "AuthenticationError", True),
    (("Auth.*",), "Auth.TokenExpired", True),
    (("Auth.*",), "NotAuthenticated", False),
    (("Auth.*",), "auth.token_expired", False),
    # nothing to match
    ((), "auth.token_expired", False),
    (("auth.*",), None, False),
    (("auth.*",), "", False),
]


@pytest.mark.parametrize(
    "patterns,error_type,expected",
    MATCH_TABLE,
    ids=[f"{list(p)}~{t!r}" for p, t, _ in MATCH_TABLE],
)
def test_non_retryable_matching(
    patterns: tuple[str, ...], error_type: str | None, expected: bool
) -> None:
    assert matches_non_retryable(patterns, error_type) is expected
    assert matches_non_retryable(list(patterns), error_type) is expected


@pytest.mark.parametrize("pattern,error_type", [("auth.*", "auth"), ("Auth.*", "Auth")])
def test_prefix_pattern_does_not_match_its_bare_stem(pattern: str, error_type: str) -> None:
    assert matches_non_retryable((pattern,), error_type) is False
