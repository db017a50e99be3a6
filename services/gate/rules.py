"""The gate's policy and calendar rules: defaults, caps, fatigue, quiet hours, time zones.

Pure functions of a policy and an instant; the decision itself runs atomically in Redis
(counters.py) with the boundaries computed here.
"""

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CHANNELS = ("email", "sms", "whatsapp", "push")
FATIGUE_WINDOW = timedelta(days=7)
# Fatigue in hundredths: each message in the window adds 0.10, so 7 messages = 0.70, capped at 1.00.
FATIGUE_PER_MESSAGE = 10
FATIGUE_MAX = 100
# Quiet hours never apply to email.
QUIET_HOURS_EXEMPT = frozenset({"email"})
MINUTES_PER_DAY = 24 * 60


@dataclass(frozen=True)
class Window:
    """A daily window [start, end) in local minutes after midnight; it may wrap midnight."""

    start_minute: int
    end_minute: int

    def contains(self, minute: int) -> bool:
        """Whether a local minute of the day falls inside the window."""
        if self.start_minute == self.end_minute:
            return False
        if self.start_minute < self.end_minute:
            return self.start_minute <= minute < self.end_minute
        return minute >= self.start_minute or minute < self.end_minute


DEFAULT_QUIET_HOURS = Window(21 * 60, 9 * 60)
DEFAULT_CHANNEL_CAPS = {"email": 5, "sms": 1, "whatsapp": 2, "push": 3}


@dataclass(frozen=True)
class ShopPolicy:
    """A shop's contact policy; the spec's defaults for everything a shop did not set."""

    global_daily_cap: int = 3
    channel_caps: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_CHANNEL_CAPS))
    fatigue_threshold: int = 70  # hundredths: 70 = 0.70
    quiet_hours: Window = DEFAULT_QUIET_HOURS
    time_zone: str = "UTC"
    region_quiet_hours: dict[str, Window] = field(default_factory=dict)

    def quiet_hours_for(self, time_zone: str) -> Window:
        """The window for a customer's zone: the longest matching region prefix, else the shop's."""
        matches = [region for region in self.region_quiet_hours if time_zone.startswith(region)]
        if not matches:
            return self.quiet_hours
        return self.region_quiet_hours[max(matches, key=len)]


def zone(name: str) -> ZoneInfo:
    """The IANA zone of that name; ValueError when there is none (a name the zone database
    reads as a folder or as too long a file name included)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as unknown:
        raise ValueError(f"unknown time zone {name[:64]!r}") from unknown


def _local_instant(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The first instant at which the local wall clock reads `at` on `day` or later: an ambiguous
    time (clocks going back) is its first occurrence; a skipped one (clocks going forward) is the
    instant of the jump."""
    wall = datetime.combine(day, at)
    first = wall.replace(tzinfo=tz).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # Skipped: the jump lies between the two readings of the wall time; find it to the second.
    low, high = wall.replace(tzinfo=tz, fold=1).astimezone(UTC), first
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(tz).replace(tzinfo=None) >= wall:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0)


@dataclass(frozen=True)
class Boundaries:
    """What the atomic check needs to know about the customer's calendar at one instant."""

    now: datetime
    day_start: datetime
    next_midnight: datetime
    quiet: bool
    quiet_end: datetime | None


def boundaries(now: datetime, time_zone: str, window: Window, channel: str) -> Boundaries:
    """The customer's local day and quiet hours at `now` (UTC-aware), DST-safe."""
    tz = zone(time_zone)
    local = now.astimezone(tz)
    today = local.date()
    day_start = _local_instant(today, time.min, tz)
    next_midnight = _local_instant(today + timedelta(days=1), time.min, tz)
    minute = local.hour * 60 + local.minute
    quiet = channel not in QUIET_HOURS_EXEMPT and window.contains(minute)
    quiet_end = None
    if quiet:
        end = time(window.end_minute // 60, window.end_minute % 60)
        end_day = today if minute < window.end_minute else today + timedelta(days=1)
        quiet_end = _local_instant(end_day, end, tz)
        if quiet_end <= now:
            # The end falls in an hour the clocks repeat, and its first pass is behind us.
            quiet_end = datetime.combine(end_day, end, tzinfo=tz).replace(fold=1).astimezone(UTC)
    return Boundaries(now, day_start, next_midnight, quiet, quiet_end)


def format_fatigue(hundredths: int) -> str:
    """Fatigue as the reason strings write it: 70 -> "0.70"."""
    return f"{hundredths // 100}.{hundredths % 100:02d}"


def parse_fatigue(text: str) -> int:
    """ "0.70" -> 70; ValueError unless a decimal in (0, 1] with at most two places."""
    whole, _, fraction = text.strip().partition(".")
    if not whole.isdigit() or (fraction and not fraction.isdigit()) or len(fraction) > 2:
        raise ValueError(f"{text!r} is not a decimal with at most two places")
    hundredths = int(whole) * 100 + int(fraction.ljust(2, "0") or 0)
    if not 0 < hundredths <= FATIGUE_MAX:
        raise ValueError(f"{text!r} is not in (0, 1]")
    return hundredths
