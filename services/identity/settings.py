"""Settings of the identity service."""

from typing import ClassVar

from pydantic import Field

from services.runtime.settings import RuntimeSettings, ServiceName


class IdentitySettings(RuntimeSettings):
    """The shared runtime settings, and the identity service's own."""

    service: ClassVar[ServiceName] = "identity"

    shop_policy_ttl_seconds: float = Field(
        5.0, description="How long a replica caches a shop's identity policy before reading it."
    )
