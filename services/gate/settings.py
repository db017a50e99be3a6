"""Settings of the gate service."""

from typing import ClassVar

from pydantic import Field

from services.runtime.settings import RuntimeSettings, ServiceName


class GateSettings(RuntimeSettings):
    """The shared runtime settings, for the gate service."""

    service: ClassVar[ServiceName] = "gate"

    redis_url: str | None = Field(
        None, validation_alias="REDIS_URL", description="redis://… ; unset = in-process counters."
    )
