"""Settings of the gdpr service."""

from typing import ClassVar

from services.runtime.settings import RuntimeSettings, ServiceName


class GdprSettings(RuntimeSettings):
    """The shared runtime settings, for the gdpr service."""

    service: ClassVar[ServiceName] = "gdpr"
