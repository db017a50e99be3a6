"""Settings of the enrichment service."""

from typing import ClassVar

from services.runtime.settings import RuntimeSettings, ServiceName


class EnrichmentSettings(RuntimeSettings):
    """The shared runtime settings, for the enrichment service."""

    service: ClassVar[ServiceName] = "enrichment"
