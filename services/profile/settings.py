"""Settings of the profile service."""

from typing import ClassVar

from services.runtime.settings import RuntimeSettings, ServiceName


class ProfileSettings(RuntimeSettings):
    """The shared runtime settings, for the profile service."""

    service: ClassVar[ServiceName] = "profile"
