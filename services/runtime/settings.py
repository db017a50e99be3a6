"""Typed settings from the environment, shared by every service."""

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ServiceName = Literal["identity", "profile", "enrichment", "gate", "gdpr"]
SERVICES: tuple[ServiceName, ...] = ("identity", "profile", "enrichment", "gate", "gdpr")


class TokenConfig(BaseModel):
    """One bearer token: who holds it, which shops it may touch, which roles it has."""

    name: str = Field(description="Who holds the token, for logs and audit (never the secret).")
    token: SecretStr = Field(description="The bearer secret presented in `authorization`.")
    shops: list[str] = Field(description='Shop ids the token may touch; ["*"] for every shop.')
    roles: list[Literal["read", "write", "gdpr", "admin"]] = Field(
        description="Roles granted; admin implies all."
    )


class RuntimeSettings(BaseSettings):
    """Settings every service reads. Variables are prefixed C360_, except the standard ones."""

    # A variable set to nothing is unset (env_ignore_empty): `SHOPIFY_API_SECRET_PREVIOUS=` left
    # blank after a rotation must not become an empty HMAC key anyone could sign webhooks with.
    model_config = SettingsConfigDict(
        env_prefix="C360_",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        env_ignore_empty=True,
    )

    service: ClassVar[ServiceName]

    host: str = Field("[::]", description="Interface the gRPC server binds.")
    identity_port: int = Field(50051, description="Port of the identity service.")
    profile_port: int = Field(50052, description="Port of the profile service.")
    enrichment_port: int = Field(50053, description="Port of the enrichment service.")
    gate_port: int = Field(50054, description="Port of the gate service.")
    gdpr_port: int = Field(50055, description="Port of the gdpr service.")
    identity_addr: str | None = Field(None, description="Identity's address; localhost:port.")
    profile_addr: str | None = Field(None, description="Profile's address; localhost:port.")
    enrichment_addr: str | None = Field(None, description="Enrichment's address; localhost:port.")
    gate_addr: str | None = Field(None, description="Gate's address; localhost:port.")
    gdpr_addr: str | None = Field(None, description="Gdpr's address; localhost:port.")

    database_url: str | None = Field(
        None,
        validation_alias="DATABASE_URL",
        description="postgresql+asyncpg://… ; unset = a SQLite file per service under data_dir.",
    )
    db_schema_prefix: str = Field(
        "", description="Prefix of the PostgreSQL schema holding this service's tables."
    )
    data_dir: Path = Field(Path("data"), description="Folder of the embedded SQLite files.")

    tokens: list[TokenConfig] = Field(
        default_factory=list, description="Bearer tokens accepted, as a JSON list (a Secret)."
    )
    dev_token: SecretStr | None = Field(
        None, description="A development admin token for every shop; never set in production."
    )
    service_token: SecretStr | None = Field(
        None, description="The token this service presents when it calls its peers."
    )

    log_level: str = Field("INFO", description="Python log level of the JSON logs.")
    max_connection_age_seconds: float = Field(
        300.0,
        gt=0,
        description="A client connection is asked to go (GOAWAY) after this long, so that "
        "clients resolve the service again and spread over replicas added since; calls in "
        "flight get an hour to finish, streams included.",
    )
    shutdown_grace_seconds: float = Field(
        10.0, description="How long in-flight RPCs may finish after SIGTERM."
    )
    shutdown_drain_seconds: float = Field(
        0.0,
        description="How long a stopping server keeps answering NOT_SERVING before it stops "
        "taking calls, so that load balancers notice (a few seconds in Kubernetes).",
    )
    health_interval_seconds: float = Field(
        2.0, description="How often dependencies (database, Redis) are probed for health."
    )
    dependency_timeout_seconds: float = Field(
        1.0, description="How long one dependency probe may take before it counts as down."
    )

    def port(self, service: ServiceName) -> int:
        """The port a service listens on."""
        port: int = getattr(self, f"{service}_port")
        return port

    def address(self, service: ServiceName) -> str:
        """Where to reach a service: its configured address, or localhost and its port."""
        addr: str | None = getattr(self, f"{service}_addr")
        return addr or f"localhost:{self.port(service)}"

    @property
    def listen_address(self) -> str:
        """host:port this service binds."""
        return f"{self.host}:{self.port(self.service)}"

    @property
    def schema_name(self) -> str:
        """The PostgreSQL schema of this service's tables: the prefix and the service's name."""
        return f"{self.db_schema_prefix}{self.service}"

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL: DATABASE_URL, or the service's embedded SQLite file."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / f'{self.service}.db'}"
