"""Settings of the identity service."""

from typing import ClassVar

from services.runtime.settings import RuntimeSettings, ServiceName


class IdentitySettings(RuntimeSettings):
    """The shared runtime settings, for the identity service."""

    service: ClassVar[ServiceName] = "identity"
