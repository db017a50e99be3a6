"""A clock the test moves, for services whose rules depend on time."""

from datetime import datetime


class Clock:
    """Time as the test says."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, now: datetime) -> None:
        self.now = now
