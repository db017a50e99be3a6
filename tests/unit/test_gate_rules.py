"""The gate's calendar and policy rules, and its key layout."""

from datetime import UTC, datetime

import pytest
from redis.asyncio import Connection

from services.gate.counters import CustomerKeys, HiredisPackedConnection
from services.gate.rules import Window, boundaries, format_fatigue, parse_fatigue


def test_customer_keys_share_one_hash_tag() -> None:
    assert CustomerKeys.of("shop-a", "p1").all() == [
        "c360:gate:{shop-a:p1}:policy",
        "c360:gate:{shop-a:p1}:sent",
        "c360:gate:{shop-a:p1}:channels",
        "c360:gate:{shop-a:p1}:log",
    ]


@pytest.mark.parametrize(
    ("window", "minute", "inside"),
    [
        (Window(21 * 60, 9 * 60), 21 * 60, True),
        (Window(21 * 60, 9 * 60), 9 * 60 - 1, True),
        (Window(21 * 60, 9 * 60), 9 * 60, False),
        (Window(21 * 60, 9 * 60), 20 * 60 + 59, False),
        (Window(13 * 60, 14 * 60), 13 * 60 + 30, True),
        (Window(13 * 60, 14 * 60), 14 * 60, False),
        (Window(0, 0), 0, False),
    ],
)
def test_quiet_windows_are_half_open_and_may_wrap(
    window: Window, minute: int, inside: bool
) -> None:
    assert window.contains(minute) is inside


def test_a_quiet_end_in_a_repeated_hour_is_never_in_the_past() -> None:
    # 02:15 on the second pass of 25 October in Paris (01:15 UTC); the window ends at 02:30.
    now = datetime(2026, 10, 25, 1, 15, tzinfo=UTC)
    day = boundaries(now, "Europe/Paris", Window(21 * 60, 2 * 60 + 30), "sms")
    assert day.quiet is True
    assert day.quiet_end == datetime(2026, 10, 25, 1, 30, tzinfo=UTC)


def test_a_skipped_midnight_starts_the_day_at_the_jump() -> None:
    now = datetime(2026, 9, 6, 12, 0, tzinfo=UTC)  # Santiago skips 00:00-01:00 that day
    day = boundaries(now, "America/Santiago", Window(21 * 60, 9 * 60), "email")
    assert day.day_start == datetime(2026, 9, 6, 4, 0, tzinfo=UTC)
    assert (day.quiet, day.quiet_end) == (False, None)


@pytest.mark.parametrize(("text", "hundredths"), [("0.70", 70), ("0.5", 50), ("1", 100)])
def test_fatigue_thresholds_parse_to_hundredths(text: str, hundredths: int) -> None:
    assert parse_fatigue(text) == hundredths
    assert parse_fatigue(format_fatigue(hundredths)) == hundredths


@pytest.mark.parametrize("text", ["0", "1.01", "0.705", "-0.1", "x", ""])
def test_bad_fatigue_thresholds_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=r"not"):
        parse_fatigue(text)


@pytest.mark.parametrize(
    "command",
    [
        ("EVALSHA", "abc", 4, "k1", "k2", "k3", "k4", "check", "m-é", "email", "1,0", ",1,2,0,0"),
        ("SCRIPT LOAD", "return 1"),
        ("CLIENT SETINFO", "LIB-NAME", "redis-py"),
        ("XRANGE", b"c360:gate:{s:p}:log", "-", "+"),
        ("PEXPIRE", "key", 691200000),
    ],
)
def test_hiredis_packing_sends_the_bytes_redis_py_would(
    command: tuple[str | bytes | int, ...],
) -> None:
    python_packed = b"".join(Connection().pack_command(*command))
    assert HiredisPackedConnection().pack_command(*command) == [python_packed]
