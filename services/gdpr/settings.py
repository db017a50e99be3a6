"""Settings of the gdpr service."""

from typing import ClassVar

from pydantic import Field

from services.runtime.settings import RuntimeSettings, ServiceName


class GdprSettings(RuntimeSettings):
    """The shared runtime settings, and the gdpr service's own."""

    service: ClassVar[ServiceName] = "gdpr"

    job_interval_seconds: float = Field(
        1.0,
        gt=0,
        description="How often unfinished erasure jobs (a step failed: a service was down) and "
        "shop redactions whose grace period ended are run again.",
    )
    shop_redaction_grace_days: int = Field(
        30,
        ge=0,
        description="Days between an uninstalled shop's shop/redact (or a RedactShop without "
        "`immediately`) and the removal of all its data.",
    )
    retention_days: int = Field(
        1095,
        gt=0,
        le=36500,
        description="Days after a customer was last seen that the data inventory counts their "
        "record as past retention (3 years: the common guidance for marketing data after the "
        "last contact). A request's `retention_days` overrides it.",
    )
