"""Settings of the profile service."""

from typing import ClassVar

from pydantic import Field, SecretStr

from services.runtime.settings import RuntimeSettings, ServiceName


class ProfileSettings(RuntimeSettings):
    """The shared runtime settings, and the profile service's own."""

    service: ClassVar[ServiceName] = "profile"

    gate_push_interval_seconds: float = Field(
        0.2,
        description="How often the consent outbox is read when no change woke it: contact "
        "policies reach the gate within about this long.",
    )
    identity_follow_interval_seconds: float = Field(
        0.5,
        description="How often identity's changes are read: a merge or unmerge reaches the "
        "gate's contact policies within about this long.",
    )
    summary_refresh_interval_seconds: float = Field(
        0.5,
        description="How often persons' summaries (what segments and exports read) are "
        "refreshed when no change woke the refresher: they follow facts within about this long.",
    )
    feed_poll_interval_seconds: float = Field(
        0.1,
        description="How often a caught-up change feed stream looks for new changes.",
    )
    webhook_port: int = Field(
        8080, description="Port of the HTTP webhook endpoint (POST /webhooks/shopify); 0 = any."
    )
    shopify_api_secret: SecretStr | None = Field(
        None,
        validation_alias="SHOPIFY_API_SECRET",
        description="The Shopify app's client secret: webhooks must be signed with it.",
    )
    shopify_api_secret_previous: SecretStr | None = Field(
        None,
        validation_alias="SHOPIFY_API_SECRET_PREVIOUS",
        description="The secret being rotated out, still accepted until it is unset.",
    )
    shopify_shops: dict[str, str] = Field(
        default_factory=dict,
        description='Shop domain -> shop id, e.g. {"acme.myshopify.com": "acme"}; a domain '
        "not listed is its own shop id.",
    )
    webhook_max_attempts: int = Field(
        12,
        description="Processing attempts of a delivery before it becomes a dead letter (backoff "
        "doubling from 2 s to 5 min: about half an hour of outage is ridden out).",
    )
