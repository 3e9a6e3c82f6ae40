"""Cron: the scheduling math (pure) and the CronTicker inside a running engine.

The pure tests pin exact UTC instants, including the America/New_York DST
transitions of 2026 (spring forward on Sun 2026-03-08, fall back on Sun
2026-11-01).  The ticker tests run under ``MockClock(autojump_threshold=0)``
with the engine's wall clock at ``BASE + trio.current_time()``, where BASE is
30 s past a minute boundary, so "a per-minute schedule over five minutes" is
exact and instant; the DST ticker test starts its clock just before each
transition instead.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
import trio.testing
from croniter import croniter
from mockclock import engine_on_clock, real_time_limit

import ojs_trio.engine.cron as cron_module
from ojs_trio.actors.cron import CronTicker
from ojs_trio.engine.cron import (
    CronFire,
    CronRecord,
    next_occurrence,
    parse_cron_request,
    skipped_by_dst,
)
from ojs_trio.engine.engine import Engine
from ojs_trio.engine.errors import InvalidCronExpression, InvalidRequest, NotFound
from ojs_trio.engine.job import Job
from ojs_trio.engine.states import JobState
from ojs_trio.engine.timeutil import format_ts
from ojs_trio.storage.memory import MemoryStorage


def utc(text: str) -> float:
    """Epoch seconds of an ISO 8601 timestamp with offset."""
    return datetime.fromisoformat(text).timestamp()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def occurrences(expression: str, timezone: str, after: str, count: int) -> list[str]:
    out, t = [], utc(after)
    for _ in range(count):
        t = next_occurrence(expression, timezone, t)
        out.append(iso(t))
    return out


# -- next_occurrence: expressions ---------------------------------------------------

AFTER = "2026-01-15T10:17:23+00:00"  # a Thursday


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("*/5 * * * *", ["2026-01-15T10:20:00Z", "2026-01-15T10:25:00Z"]),
        ("0 9 * * *", ["2026-01-16T09:00:00Z", "2026-01-17T09:00:00Z"]),
        ("15,45 10-11 * * *", ["2026-01-15T10:45:00Z", "2026-01-15T11:15:00Z"]),
        ("0 9 * * MON-FRI", ["2026-01-16T09:00:00Z", "2026-01-19T09:00:00Z"]),
        ("0 0 * * 7", ["2026-01-18T00:00:00Z", "2026-01-25T00:00:00Z"]),  # 7 is Sunday
        ("0 0 * * sun", ["2026-01-18T00:00:00Z", "2026-01-25T00:00:00Z"]),
        ("0 12 1 JAN *", ["2027-01-01T12:00:00Z", "2028-01-01T12:00:00Z"]),
        ("  0   9 * *   *  ", ["2026-01-16T09:00:00Z", "2026-01-17T09:00:00Z"]),
    ],
)
def test_five_field_expressions(expression: str, expected: list[str]) -> None:
    assert occurrences(expression, "UTC", AFTER, 2) == expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("@hourly", ["2026-01-15T11:00:00Z", "2026-01-15T12:00:00Z"]),
        ("@daily", ["2026-01-16T00:00:00Z", "2026-01-17T00:00:00Z"]),
        ("@midnight", ["2026-01-16T00:00:00Z", "2026-01-17T00:00:00Z"]),
        ("@weekly", ["2026-01-18T00:00:00Z", "2026-01-25T00:00:00Z"]),  # Sundays
        ("@monthly", ["2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"]),
        ("@yearly", ["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"]),
        ("@annually", ["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"]),
        ("@DAILY", ["2026-01-16T00:00:00Z", "2026-01-17T00:00:00Z"]),
    ],
)
def test_shorthands(expression: str, expected: list[str]) -> None:
    assert occurrences(expression, "UTC", AFTER, 2) == expected


def test_next_occurrence_is_strictly_after() -> None:
    on_the_hour = utc("2026-01-15T11:00:00+00:00")
    assert iso(next_occurrence("@hourly", "UTC", on_the_hour)) == "2026-01-15T12:00:00Z"
    assert iso(next_occurrence("@hourly", "UTC", on_the_hour - 0.001)) == "2026-01-15T11:00:00Z"


@pytest.mark.parametrize(
    ("expression", "seconds"),
    [
        ("@every 30s", 30.0),
        ("@every 5m", 300.0),
        ("@every 1h30m", 5400.0),
        ("@every 2h45m30s", 9930.0),
        ("@every PT5M", 300.0),
        ("@every PT1H30M", 5400.0),
        ("@every pt30s", 30.0),
    ],
)
def test_every_is_anchored_to_the_previous_run(expression: str, seconds: float) -> None:
    anchor = utc(AFTER)  # not aligned to anything: @every is relative
    assert next_occurrence(expression, "UTC", anchor) == pytest.approx(anchor + seconds)
    # Time zones play no part in an interval.
    assert next_occurrence(expression, "America/New_York", anchor) == pytest.approx(
        anchor + seconds
    )


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("*/10 * * * * *", ["2026-01-15T10:17:30Z", "2026-01-15T10:17:40Z"]),
        ("0 * * * * *", ["2026-01-15T10:18:00Z", "2026-01-15T10:19:00Z"]),
        ("15 30 * * * *", ["2026-01-15T10:30:15Z", "2026-01-15T11:30:15Z"]),
        ("0 0 9 * * MON-FRI", ["2026-01-16T09:00:00Z", "2026-01-19T09:00:00Z"]),
    ],
)
def test_six_field_expressions_have_seconds_first(expression: str, expected: list[str]) -> None:
    """ojs-cron 3.2: in a 6-field expression the FIRST field is the second."""
    assert occurrences(expression, "UTC", AFTER, 2) == expected


def test_per_second_schedule_is_cheap_to_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    candidates = 0

    class CountingCroniter(croniter):
        def get_next(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal candidates
            candidates += 1
            return super().get_next(*args, **kwargs)

    monkeypatch.setattr(cron_module, "croniter", CountingCroniter)
    after = utc(AFTER)
    assert next_occurrence("* * * * * *", "UTC", after) == after + 1
    # A correct answer needs one candidate; allow a minute's worth of look-back.
    assert candidates <= 60


@pytest.mark.parametrize(
    "expression",
    [
        "not a valid cron",
        "0 0 0 0 0 0 0",
        "99 25 32 13 8",
        "* * * *",
        "60 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * * 13 *",
        "* * * * 8",
        "",
        "   ",
        "@fortnightly",
        "@every",
        "@every 0s",
        "@every soon",
        "@every 5 minutes",
        "@every P",
    ],
)
def test_invalid_expressions_are_a_400(expression: str) -> None:
    with pytest.raises(InvalidCronExpression) as excinfo:
        next_occurrence(expression, "UTC", utc(AFTER))
    assert excinfo.value.http_status == 400
    assert excinfo.value.code == "invalid_cron_expression"


# -- next_occurrence: time zones and DST ----------------------------------------------


def test_asia_tokyo_nine_am_is_midnight_utc() -> None:
    assert occurrences("0 9 * * *", "Asia/Tokyo", "2026-01-15T00:00:00+00:00", 2) == [
        "2026-01-16T00:00:00Z",
        "2026-01-17T00:00:00Z",
    ]
    # Just before 00:00 UTC it is 08:59 in Tokyo: the next run is a minute away.
    assert occurrences("0 9 * * *", "Asia/Tokyo", "2026-01-15T23:59:00+00:00", 1) == [
        "2026-01-16T00:00:00Z"
    ]


def test_spring_forward_gap_does_not_fire() -> None:
    """02:30 does not exist in New York on 2026-03-08 (02:00 EST -> 03:00 EDT)."""
    assert occurrences("30 2 * * *", "America/New_York", "2026-03-06T12:00:00+00:00", 3) == [
        "2026-03-07T07:30:00Z",  # 02:30 EST
        "2026-03-09T06:30:00Z",  # 02:30 EDT: 03-08 was skipped
        "2026-03-10T06:30:00Z",
    ]


def test_spring_forward_does_not_substitute_a_time_inside_the_gap() -> None:
    # Right before the gap, the next 02:30 is the following day, never 03:30 on 03-08.
    before_gap = "2026-03-08T06:59:00+00:00"  # 01:59 EST
    assert occurrences("30 2 * * *", "America/New_York", before_gap, 1) == ["2026-03-09T06:30:00Z"]
    # Times on either side of the gap still fire on the transition day.
    assert occurrences("30 1 * * *", "America/New_York", "2026-03-08T00:00:00+00:00", 1) == [
        "2026-03-08T06:30:00Z"  # 01:30 EST
    ]
    assert occurrences("30 3 * * *", "America/New_York", "2026-03-08T00:00:00+00:00", 1) == [
        "2026-03-08T07:30:00Z"  # 03:30 EDT
    ]


def test_skipped_by_dst_lists_the_wall_times_the_gap_removed() -> None:
    """Walking back from the first occurrence after the gap to the one before it."""
    ny = "America/New_York"
    after_gap = utc("2026-03-09T06:30:00+00:00")  # 02:30 EDT on 03-09
    registered = utc("2026-01-01T00:00:00+00:00")
    gap = skipped_by_dst("30 2 * * *", ny, after_gap, registered)
    # 02:30 on 03-08, placed at the offset in force before the jump (EST: 07:30Z).
    assert [(local.isoformat(), iso(at)) for local, at in gap] == [
        ("2026-03-08T02:30:00", "2026-03-08T07:30:00Z")
    ]
    first_after = utc("2026-03-08T07:00:00+00:00")  # 03:00 EDT, the first after the jump
    per_minute = skipped_by_dst("* * * * *", ny, first_after, registered)
    assert [local.strftime("%H:%M") for local, _ in per_minute] == [
        f"02:{m:02d}" for m in range(60)
    ]
    # Nothing skipped: an ordinary day, no DST (UTC, @every), or registered after the gap.
    assert skipped_by_dst("30 2 * * *", ny, utc("2026-03-10T06:30:00+00:00"), registered) == []
    assert skipped_by_dst("30 2 * * *", "UTC", after_gap, registered) == []
    assert skipped_by_dst("@every 1h", ny, first_after, registered) == []
    late_registration = utc("2026-03-08T12:00:00+00:00")
    assert skipped_by_dst("30 2 * * *", ny, after_gap, late_registration) == []
    # Fall back repeats an hour; it removes nothing.
    fall_back = utc("2026-11-02T06:30:00+00:00")
    assert skipped_by_dst("30 1 * * *", ny, fall_back, registered) == []


def test_fall_back_repeated_time_fires_exactly_once() -> None:
    """01:30 happens twice in New York on 2026-11-01; it fires at the first (EDT) one."""
    assert occurrences("30 1 * * *", "America/New_York", "2026-10-31T12:00:00+00:00", 3) == [
        "2026-11-01T05:30:00Z",  # 01:30 EDT
        "2026-11-02T06:30:00Z",  # 01:30 EST, next day: the 06:30Z repeat was not used
        "2026-11-03T06:30:00Z",
    ]


@pytest.mark.parametrize(
    "after",
    [
        "2026-11-01T05:30:00+00:00",  # exactly at the first 01:30
        "2026-11-01T06:00:00+00:00",  # 01:00 EST, the second pass of the repeated hour
        "2026-11-01T06:29:59+00:00",  # just before the second 01:30
        "2026-11-01T06:30:00+00:00",  # exactly at the second 01:30
    ],
)
def test_fall_back_second_pass_does_not_fire_again(after: str) -> None:
    assert occurrences("30 1 * * *", "America/New_York", after, 1) == ["2026-11-02T06:30:00Z"]


def test_weekday_nine_am_stays_nine_am_local_across_dst() -> None:
    spring = occurrences("0 9 * * 1-5", "America/New_York", "2026-03-05T12:00:00+00:00", 4)
    assert spring == [
        "2026-03-05T14:00:00Z",  # Thu, EST
        "2026-03-06T14:00:00Z",  # Fri, EST
        "2026-03-09T13:00:00Z",  # Mon, EDT (the weekend held the change)
        "2026-03-10T13:00:00Z",
    ]
    autumn = occurrences("0 9 * * 1-5", "America/New_York", "2026-10-29T12:00:00+00:00", 4)
    assert autumn == [
        "2026-10-29T13:00:00Z",  # Thu, EDT
        "2026-10-30T13:00:00Z",  # Fri, EDT
        "2026-11-02T14:00:00Z",  # Mon, EST
        "2026-11-03T14:00:00Z",
    ]


def test_hourly_schedule_across_the_fall_back_hour_has_no_duplicates() -> None:
    runs = occurrences("0 * * * *", "America/New_York", "2026-11-01T03:30:00+00:00", 5)
    assert len(set(runs)) == len(runs)
    assert runs == sorted(runs)


@pytest.mark.parametrize(
    "timezone", ["+05:00", "-08:00", "UTC+5", "EST", "PST", "CST", "", "Not/AZone", "utc"]
)
def test_fixed_offsets_abbreviations_and_unknown_zones_are_rejected(timezone: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        next_occurrence("0 9 * * *", timezone, utc(AFTER))
    assert excinfo.value.http_status == 400
    assert (excinfo.value.details or {}).get("field") == "timezone"


@pytest.mark.parametrize("timezone", ["UTC", "Europe/London", "Asia/Kolkata", "Pacific/Auckland"])
def test_iana_zones_are_accepted(timezone: str) -> None:
    assert next_occurrence("0 9 * * *", timezone, utc(AFTER)) > utc(AFTER)


# -- the CronTicker in a running engine (MockClock) -------------------------------------


def test_cron_record_from_a_newer_server_is_read_and_rewritten_whole() -> None:
    record = parse_cron_request(
        {"name": "n", "expression": "@daily", "job_template": {"type": "t", "args": []}},
        utc("2026-01-15T10:00:00+00:00"),
    )
    stored = record.to_record()
    newer = {**stored, "jitter_ms": 500, "owner": {"team": "ops"}}
    read = CronRecord.from_record(newer)
    assert read.unknown_fields == {"jitter_ms": 500, "owner": {"team": "ops"}}
    assert read.to_record() == newer
    assert "jitter_ms" not in read.to_wire() and "unknown_fields" not in read.to_wire()
    # And one written before unknown_fields existed.
    assert CronRecord.from_record(stored) == record


BASE = utc("2026-01-15T10:00:30+00:00")  # mock time 0; minutes tick at 30, 90, 150, ...
FIRST_MINUTE = 30.0  # mock time of the first per-minute occurrence


def wall() -> float:
    return BASE + trio.current_time()


def running_engine(
    storage: MemoryStorage | None = None, **config: Any
) -> AbstractAsyncContextManager[Engine]:
    config.setdefault("clock", wall)
    return engine_on_clock(storage, **config)


def cron_body(name: str = "tick", expression: str = "* * * * *", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "expression": expression,
        "job_template": {"type": "cron.tick", "args": [name], "options": {"queue": "cron"}},
        **extra,
    }


def enqueued(engine: Engine) -> list[dict[str, Any]]:
    return engine.events.query(types=["job.enqueued"], queues=["cron"], limit=10_000)


async def test_per_minute_schedule_fires_once_per_minute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            record = await engine.put_cron(cron_body(overlap_policy="allow"))
            assert record.next_run_at == BASE + FIRST_MINUTE
            await trio.sleep_until(5 * 60.0)  # 10:05:30: five minute boundaries passed

            jobs = await engine.fetch(["cron"], 100)
            assert len(jobs) == 5
            minutes = [BASE + FIRST_MINUTE + 60.0 * n for n in range(5)]
            assert [j.meta for j in jobs] == [
                {"cron_name": "tick", "cron_occurrence": format_ts(m)} for m in minutes
            ]
            assert all(j.type == "cron.tick" and j.args == ["tick"] for j in jobs)
            # Each job was created at its minute, not late and not in a burst.
            assert [j.created_at for j in jobs] == pytest.approx(minutes)
            assert [e["time"] for e in enqueued(engine)] == [format_ts(m) for m in minutes]

            record = await engine.get_cron("tick")
            assert record.runs == 5
            assert record.last_run_at == minutes[-1]
            assert record.last_job_id == jobs[-1].id
            assert record.next_run_at == minutes[-1] + 60.0
            assert engine.cron_ticker.fired == 5


async def test_every_interval_fires_from_registration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            await trio.sleep(7.0)  # register off any boundary
            await engine.put_cron(cron_body("every", "@every 30s", overlap_policy="allow"))
            await trio.sleep_until(7.0 + 150.0 + 1.0)
            jobs = await engine.fetch(["cron"], 100)
            assert [j.created_at - BASE for j in jobs] == pytest.approx(
                [37.0, 67.0, 97.0, 127.0, 157.0]
            )


async def test_overlap_skip_while_the_previous_run_is_active(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            await engine.put_cron(cron_body())  # overlap_policy defaults to skip
            await trio.sleep_until(FIRST_MINUTE + 1.0)
            (first,) = await engine.fetch(["cron"], 10, visibility_ms=3_600_000)
            assert first.meta is not None and first.meta["cron_name"] == "tick"

            # Two more minute boundaries pass while `first` is active: both skipped.
            await trio.sleep_until(FIRST_MINUTE + 120.0 + 1.0)
            assert len(enqueued(engine)) == 1
            assert await engine.fetch(["cron"], 10) == []
            record = await engine.get_cron("tick")
            assert (record.runs, record.skipped) == (1, 2)
            assert record.next_run_at == BASE + FIRST_MINUTE + 180.0
            assert engine.cron_ticker.skipped == 2
            cron_events = engine.events.query(types=["cron.triggered", "cron.skipped"])
            assert [(e["type"], e["data"]["cron_name"]) for e in cron_events] == [
                ("cron.triggered", "tick"),
                ("cron.skipped", "tick"),
                ("cron.skipped", "tick"),
            ]
            # ojs-cron 9.1 and 9.2.
            schedule = {"cron_name": "tick", "cron_expression": "* * * * *", "timezone": "UTC"}
            first_minute = format_ts(BASE + FIRST_MINUTE)
            assert cron_events[0]["data"] == {
                **schedule,
                "job_id": first.id,
                "job_type": "cron.tick",
                "queue": "cron",
                "run_count": 1,
                "scheduled_time": first_minute,
                "actual_time": first_minute,
            }
            assert [e["data"] for e in cron_events[1:]] == [
                {
                    **schedule,
                    "reason": "overlap_skip",
                    "active_job_id": first.id,
                    "scheduled_time": format_ts(BASE + FIRST_MINUTE + 60.0 * n),
                }
                for n in (1, 2)
            ]

            await engine.ack(first.id)
            await trio.sleep_until(FIRST_MINUTE + 180.0 - 1.0)
            assert len(enqueued(engine)) == 1  # acking does not fire early
            await trio.sleep_until(FIRST_MINUTE + 180.0 + 1.0)
            (second,) = await engine.fetch(["cron"], 10)
            assert second.id != first.id
            assert second.meta is not None
            assert second.meta["cron_occurrence"] == format_ts(BASE + FIRST_MINUTE + 180.0)
            assert (await engine.get_cron("tick")).runs == 2


async def test_overlap_cancel_previous_replaces_the_active_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            await engine.put_cron(cron_body(overlap_policy="cancel_previous"))
            await trio.sleep_until(FIRST_MINUTE + 1.0)
            (first,) = await engine.fetch(["cron"], 10, visibility_ms=3_600_000)
            await trio.sleep_until(FIRST_MINUTE + 61.0)
            assert (await engine.get(first.id)).state is JobState.CANCELLED
            (second,) = await engine.fetch(["cron"], 10)
            assert second.id != first.id


async def test_worker_acking_each_run_sees_one_job_per_minute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ran: list[tuple[float, str]] = []
    with real_time_limit():
        async with running_engine() as engine:

            async def handler(ctx: Any) -> None:
                ran.append((trio.current_time(), ctx.job.meta["cron_name"]))

            engine.register("cron.tick", handler)
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run_workers, ["cron"])
                await engine.put_cron(cron_body())  # skip: each run is done before the next
                await trio.sleep_until(5 * 60.0)
                nursery.cancel_scope.cancel()
    assert ran == [(FIRST_MINUTE + 60.0 * n, "tick") for n in range(5)]


async def test_deleted_schedule_stops_firing(autojump_clock: trio.testing.MockClock) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            await engine.put_cron(cron_body(overlap_policy="allow"))
            await trio.sleep_until(FIRST_MINUTE + 60.0 + 1.0)
            assert len(enqueued(engine)) == 2
            deleted = await engine.delete_cron("tick")
            assert deleted.name == "tick"
            assert await engine.list_crons() == []
            with pytest.raises(NotFound):
                await engine.get_cron("tick")
            await trio.sleep(10 * 60.0)
            assert len(enqueued(engine)) == 2
            assert engine.cron_ticker.fired == 2


async def test_replacing_a_schedule_replans_the_ticker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            await engine.put_cron(cron_body(expression="@yearly"))
            await trio.sleep(5.0)  # the ticker now sleeps towards next year (bounded)
            await engine.put_cron(cron_body(expression="@every 10s", overlap_policy="allow"))
            await trio.sleep_until(5.0 + 10.0 + 1e-3)
            assert len(enqueued(engine)) == 1
            assert (await engine.get_cron("tick")).runs == 1  # runs survive replacement


async def test_disabled_schedule_does_not_fire(autojump_clock: trio.testing.MockClock) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            record = await engine.put_cron(cron_body(enabled=False))
            assert record.next_run_at is None  # ojs-cron 8.5
            await trio.sleep(5 * 60.0)
            assert enqueued(engine) == []


async def test_toggling_a_schedule_stops_and_resumes_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """ojs-cron 8.5: disabled keeps the registration and its history, with no next
    run; enabled again plans the next occurrence after now (none missed meanwhile)."""
    with real_time_limit():
        async with running_engine() as engine:
            await engine.put_cron(cron_body(overlap_policy="allow"))
            await trio.sleep_until(FIRST_MINUTE + 1.0)
            assert len(enqueued(engine)) == 1

            off = await engine.set_cron_enabled("tick", False)
            assert (off.enabled, off.next_run_at, off.runs) == (False, None, 1)
            assert off.to_wire()["next_run_at"] is None
            await trio.sleep(10 * 60.0)
            assert len(enqueued(engine)) == 1

            on = await engine.set_cron_enabled("tick", True)
            assert on.enabled and on.runs == 1
            assert on.next_run_at is not None and on.next_run_at > wall()
            assert on.next_run_at == BASE + FIRST_MINUTE + 11 * 60.0
            await trio.sleep_until(FIRST_MINUTE + 11 * 60.0 + 1.0)
            assert len(enqueued(engine)) == 2
            assert (await engine.get_cron("tick")).runs == 2

            with pytest.raises(InvalidRequest):
                await engine.set_cron_enabled("tick", "no")
            with pytest.raises(NotFound):
                await engine.set_cron_enabled("nope", False)


async def test_disabling_a_due_occurrence_reports_it_once() -> None:
    """ojs-cron 9.2 ``disabled``: the occurrence was due but not fired when the
    schedule was disabled.  The disabling call reports it, once; tickers that
    still saw the schedule enabled (stale lists, as on other servers) fire
    nothing and report nothing."""
    now = [BASE]
    storage = MemoryStorage()
    async with running_engine(storage, clock=lambda: now[0]) as engine:
        await engine.put_cron(cron_body(overlap_policy="allow"))
        stale = await storage.list_crons()
        now[0] = BASE + FIRST_MINUTE + 0.5  # due, not fired yet
        await engine.set_cron_enabled("tick", False)

        async def stale_view() -> list[CronRecord]:
            await trio.lowlevel.checkpoint()
            return stale

        storage.list_crons = stale_view  # type: ignore[method-assign]
        # Two ticks on the stale view (two servers): storage finds it disabled.
        await engine.cron_ticker.tick()
        await engine.cron_ticker.tick()
        assert enqueued(engine) == []
        (event,) = engine.events.query(types=["cron.skipped"])
        assert event["data"] == {
            "cron_name": "tick",
            "cron_expression": "* * * * *",
            "timezone": "UTC",
            "reason": "disabled",
            "scheduled_time": format_ts(BASE + FIRST_MINUTE),
        }
        assert engine.cron_ticker.skipped == 0  # the ticker reported nothing


async def test_disabling_before_the_occurrence_is_due_reports_nothing() -> None:
    now = [BASE]
    storage = MemoryStorage()
    async with running_engine(storage, clock=lambda: now[0]) as engine:
        await engine.put_cron(cron_body(overlap_policy="allow"))
        await engine.set_cron_enabled("tick", False)
        now[0] = BASE + 10 * 60.0
        await engine.cron_ticker.tick()
        assert enqueued(engine) == []
        assert engine.events.query(types=["cron.skipped", "cron.triggered"]) == []


async def test_missed_occurrences_fire_one_catch_up_not_a_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """ojs-cron 7.3: after downtime, at most one catch-up run, then back on schedule."""
    storage = MemoryStorage()
    with real_time_limit():
        async with running_engine(storage) as engine:
            await engine.put_cron(cron_body(overlap_policy="allow"))
        await trio.sleep_until(10 * 60.0)  # no server for ten minutes
        async with running_engine(storage) as engine:
            await trio.sleep(1.0)
            assert len(await engine.fetch(["cron"], 100)) <= 1
            record = await engine.get_cron("tick")
            assert record.next_run_at is not None and record.next_run_at > wall()
            await trio.sleep_until(FIRST_MINUTE + 600.0 + 1.0)
            (on_time,) = await engine.fetch(["cron"], 100)
            assert on_time.created_at == pytest.approx(BASE + FIRST_MINUTE + 600.0)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (cron_body(expression="not a valid cron"), InvalidCronExpression),
        (cron_body(expression="0 0 0 0 0 0 0"), InvalidCronExpression),
        (cron_body(expression="99 25 32 13 8"), InvalidCronExpression),
        (cron_body(timezone="+05:00"), InvalidRequest),
        (cron_body(timezone="EST"), InvalidRequest),
        (cron_body(overlap_policy="sometimes"), InvalidRequest),
        ({"name": "x", "expression": "* * * * *"}, InvalidRequest),  # no job_template
    ],
)
async def test_invalid_registration_is_rejected(body: dict[str, Any], error: type) -> None:
    async with running_engine(clock=lambda: BASE) as engine:
        with pytest.raises(error) as excinfo:
            await engine.put_cron(body)
        assert excinfo.value.http_status == 400
        assert await engine.list_crons() == []


async def test_registration_in_a_zone_plans_local_time() -> None:
    async with running_engine(clock=lambda: BASE) as engine:
        record = await engine.put_cron(cron_body(expression="0 9 * * *", timezone="Asia/Tokyo"))
        assert record.timezone == "Asia/Tokyo"
        assert iso(record.next_run_at or 0) == "2026-01-16T00:00:00Z"
        assert record.to_wire()["next_run_at"] == "2026-01-16T00:00:00.000Z"


# -- several tickers on one backend -----------------------------------------------------


async def test_two_engines_on_one_storage_fire_each_occurrence_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage = MemoryStorage()
    outcomes: list[CronFire] = []
    real_fire = storage.fire_cron

    async def recording_fire(*args: Any) -> CronFire:
        fire = await real_fire(*args)
        outcomes.append(fire)
        return fire

    storage.fire_cron = recording_fire  # type: ignore[method-assign]
    with real_time_limit():
        async with running_engine(storage) as a, running_engine(storage) as b:
            await a.put_cron(cron_body(overlap_policy="allow"))
            b.cron_ticker.notify_changed_nowait()  # b would notice within 30 s anyway
            await trio.sleep_until(5 * 60.0)

            jobs = await a.fetch(["cron"], 100)
            assert len(jobs) == 5
            stamps = [(j.meta or {})["cron_occurrence"] for j in jobs]
            assert stamps == [format_ts(BASE + FIRST_MINUTE + 60.0 * n) for n in range(5)]
            assert a.cron_ticker.fired + b.cron_ticker.fired == 5
            assert sum(1 for f in outcomes if f.fired) == 5
            assert all(f.fired or f.reason == "already_fired" for f in outcomes)
            assert (await a.get_cron("tick")).runs == 5


async def test_concurrent_ticks_with_the_same_view_fire_once() -> None:
    """The compare-and-set on next_run_at: two tickers that both saw the occurrence as
    due (a stale list_crons for the second) still create a single job."""
    now = [BASE]
    storage = MemoryStorage()
    async with running_engine(storage, clock=lambda: now[0]) as engine:
        await engine.put_cron(cron_body(overlap_policy="allow"))
    snapshot = await storage.list_crons()
    fired: list[Job] = []

    async def stale_view() -> list[Any]:
        await trio.lowlevel.checkpoint()
        return snapshot

    storage.list_crons = stale_view  # type: ignore[method-assign]
    tickers = [CronTicker(storage, lambda: now[0], lambda f: fired.append(f.job)) for _ in range(3)]
    now[0] = BASE + FIRST_MINUTE + 0.5
    async with trio.open_nursery() as nursery:
        for ticker in tickers:
            nursery.start_soon(ticker.tick)
    assert len(fired) == 1
    assert sum(t.fired for t in tickers) == 1
    record = storage._crons["tick"]
    assert record.runs == 1
    assert record.next_run_at == BASE + FIRST_MINUTE + 60.0


async def test_six_field_schedule_fires_on_the_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            await engine.put_cron(cron_body("fast", "*/10 * * * * *", overlap_policy="allow"))
            await trio.sleep_until(60.0 + 1e-3)
            jobs = await engine.fetch(["cron"], 100)
            # BASE is hh:00:30, so the 10-second marks fall at mock 10, 20, ..., 60.
            assert [j.created_at - BASE for j in jobs] == pytest.approx([10, 20, 30, 40, 50, 60])


# -- the ticker across DST (America/New_York, 2026) ----------------------------------------

DST_SCHEDULES = {"two-thirty": "30 2 * * *", "one-thirty": "30 1 * * *"}


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        pytest.param(
            "2026-03-07T00:00:00+00:00",
            "2026-03-09T12:00:00+00:00",
            {
                # 02:30 EST; no 02:30 on 03-08 (02:00 EST -> 03:00 EDT); 02:30 EDT.
                "two-thirty": ["2026-03-07T07:30:00Z", "2026-03-09T06:30:00Z"],
                # 01:30 exists every day: EST, EST (before the jump), then EDT.
                "one-thirty": [
                    "2026-03-07T06:30:00Z",
                    "2026-03-08T06:30:00Z",
                    "2026-03-09T05:30:00Z",
                ],
            },
            id="spring-forward",
        ),
        pytest.param(
            "2026-11-01T00:00:00+00:00",
            "2026-11-02T12:00:00+00:00",
            {
                # 01:30 happens twice on 11-01: it fires at the first (EDT) one only.
                "one-thirty": ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"],
                # 02:30 is after the repeated hour: once a day, EST.
                "two-thirty": ["2026-11-01T07:30:00Z", "2026-11-02T07:30:00Z"],
            },
            id="fall-back",
        ),
    ],
)
async def test_ticker_keeps_local_time_across_dst_in_new_york(
    autojump_clock: trio.testing.MockClock, start: str, end: str, expected: dict[str, list[str]]
) -> None:
    """A running engine's ticker, not just next_occurrence: each local 02:30 / 01:30
    that exists fires once, at its instant, and the day without one fires nothing."""
    epoch = utc(start)

    def dst_wall() -> float:
        return epoch + trio.current_time()

    # Long timer bounds: only the cron ticker (at most 30 s asleep) wakes over the days.
    quiet = {"timer_max_sleep": 3600.0, "prune_interval": 3600.0}
    with real_time_limit():
        async with running_engine(clock=dst_wall, **quiet) as engine:
            for name, expression in DST_SCHEDULES.items():
                await engine.put_cron(
                    cron_body(name, expression, timezone="America/New_York", overlap_policy="allow")
                )
            await trio.sleep_until(utc(end) - epoch)

            jobs = await engine.fetch(["cron"], 100)
            fired: dict[str, list[str]] = {name: [] for name in DST_SCHEDULES}
            for job in jobs:
                meta = job.meta or {}
                occurrence = meta["cron_occurrence"]
                assert job.created_at == pytest.approx(utc(occurrence)), "fired late or early"
                fired[meta["cron_name"]].append(iso(utc(occurrence)))
            assert fired == expected
            for name, runs in expected.items():
                record = await engine.get_cron(name)
                # `skipped` counts overlap skips; a DST gap is reported by an event.
                assert (record.runs, record.skipped) == (len(runs), 0)
                assert iso(record.last_run_at or 0) == runs[-1]

            skipped = engine.events.query(types=["cron.skipped"])
            if start.startswith("2026-03"):
                # The missing 02:30 of 03-08 is reported when 03-09's 02:30 comes due.
                (event,) = skipped
                assert event["data"] == {
                    "cron_name": "two-thirty",
                    "cron_expression": "30 2 * * *",
                    "timezone": "America/New_York",
                    "reason": "dst_skip",
                    "scheduled_time": "2026-03-08T07:30:00.000Z",  # 02:30 at EST
                    "scheduled_local_time": "2026-03-08T02:30:00",
                }
                assert event["time"] == "2026-03-09T06:30:00.000Z"
                assert engine.cron_ticker.skipped == 1
            else:
                assert skipped == []  # fall back removes no wall time
