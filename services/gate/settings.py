"""Settings of the gate service."""

from typing import ClassVar

from pydantic import Field

from services.runtime.settings import RuntimeSettings, ServiceName


class GateSettings(RuntimeSettings):
    """The shared runtime settings, and the gate's own."""

    service: ClassVar[ServiceName] = "gate"

    redis_url: str | None = Field(
        None, validation_alias="REDIS_URL", description="redis://… ; unset = in-process counters."
    )
    redis_timeout_ms: int = Field(
        50,
        description="How long a check may wait for Redis before answering gate_unavailable.",
    )
    redis_max_connections: int = Field(
        256,
        description="Connections to Redis per replica; a check waits for one at most the timeout.",
    )
    log_flush_interval_seconds: float = Field(
        0.1, description="How often decisions are copied to the durable message log."
    )
    log_retention_seconds: float = Field(
        60.0,
        description="How long Redis keeps each decision for the durable log: what a killed "
        "replica had not written yet is copied by the next replica to start within it.",
    )
    log_batch_size: int = Field(
        500, description="Decisions that trigger a copy to the message log before the interval."
    )
    shop_policy_ttl_seconds: float = Field(
        5.0, description="How long a replica caches a shop's policy before reading it again."
    )
