"""Typed settings from the environment."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.gate.settings import GateSettings
from services.identity.settings import IdentitySettings


def test_defaults_are_the_documented_ports_and_embedded_storage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "C360_DATA_DIR", "C360_GATE_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = GateSettings()
    assert [settings.port(s) for s in ("identity", "profile", "enrichment", "gate", "gdpr")] == [
        50051,
        50052,
        50053,
        50054,
        50055,
    ]
    assert settings.listen_address == "[::]:50054"
    assert settings.address("identity") == "localhost:50051"
    assert settings.sqlalchemy_url == "sqlite+aiosqlite:///data/gate.db"
    assert settings.redis_url is None
    assert settings.schema_name == "gate"


def test_environment_overrides_ports_addresses_storage_and_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("C360_IDENTITY_PORT", "6001")
    monkeypatch.setenv("C360_GATE_ADDR", "gate.c360.svc:50054")
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://c360@db:5432/c360")
    monkeypatch.setenv("C360_DB_SCHEMA_PREFIX", "staging_")
    monkeypatch.setenv(
        "C360_TOKENS",
        json.dumps([{"name": "journeys", "token": "s3cret", "shops": ["a"], "roles": ["read"]}]),
    )
    settings = IdentitySettings()
    assert settings.listen_address == "[::]:6001"
    assert settings.address("gate") == "gate.c360.svc:50054"
    assert settings.sqlalchemy_url == "postgresql+asyncpg://c360@db:5432/c360"
    assert settings.schema_name == "staging_identity"
    assert [(t.name, t.token.get_secret_value(), t.roles) for t in settings.tokens] == [
        ("journeys", "s3cret", ["read"])
    ]
    assert "s3cret" not in repr(settings)


def test_data_dir_places_the_sqlite_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("C360_DATA_DIR", str(tmp_path))
    assert IdentitySettings().sqlalchemy_url == f"sqlite+aiosqlite:///{tmp_path}/identity.db"


def test_an_unknown_role_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "C360_TOKENS", json.dumps([{"name": "x", "token": "t", "shops": ["*"], "roles": ["root"]}])
    )
    with pytest.raises(ValidationError, match="roles"):
        IdentitySettings()
