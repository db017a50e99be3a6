"""Settings of the profile service."""

from typing import ClassVar

from pydantic import Field

from services.runtime.settings import RuntimeSettings, ServiceName


class ProfileSettings(RuntimeSettings):
    """The shared runtime settings, and the profile service's own."""

    service: ClassVar[ServiceName] = "profile"

    gate_push_interval_seconds: float = Field(
        0.2,
        description="How often the consent outbox is read when no change woke it: contact "
        "policies reach the gate within about this long.",
    )
