"""Settings of the enrichment service."""

from typing import ClassVar

from pydantic import Field

from services.runtime.settings import RuntimeSettings, ServiceName


class EnrichmentSettings(RuntimeSettings):
    """The shared runtime settings, and the enrichment service's own."""

    service: ClassVar[ServiceName] = "enrichment"

    follow_interval_seconds: float = Field(
        1.0,
        description="How often persons whose facts changed or whose lifecycle deadline passed "
        "are recomputed when nothing woke the follower: stages follow within about this long.",
    )
    publish_batch: int = Field(
        1000,
        ge=1,
        le=1000,
        description="Persons per Profile.PutSignals call of a run (four calls in flight); an "
        "interrupted run resumes after the last group of calls that completed.",
    )
    daily_run_hour_utc: int | None = Field(
        None,
        description="Hour (UTC, 0-23) at which this process runs every shop it has seen each "
        "day; unset = never (in Kubernetes a CronJob calls RunShop instead).",
    )
