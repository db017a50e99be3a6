"""Roles and shop scope of tokens; every RPC of the contract declares the role it needs."""

import pytest
from google.protobuf import descriptor_pool
from pydantic import SecretStr

from c360.common.v1 import common_pb2
from c360.enrichment.v1 import enrichment_pb2  # noqa: F401  (registers the descriptors)
from c360.gate.v1 import gate_pb2  # noqa: F401
from c360.gdpr.v1 import gdpr_pb2  # noqa: F401
from c360.identity.v1 import identity_pb2  # noqa: F401
from c360.profile.v1 import profile_pb2  # noqa: F401
from services.runtime.auth import Principal, TokenRegistry, required_role
from services.runtime.settings import TokenConfig
from tests.rpc import FULL_NAMES


@pytest.mark.parametrize("service", FULL_NAMES.values())
def test_every_rpc_declares_a_required_role(service: str) -> None:
    descriptor = descriptor_pool.Default().FindServiceByName(service)
    undeclared = [
        m.name
        for m in descriptor.methods
        if required_role(f"/{service}/{m.name}") == common_pb2.ROLE_UNSPECIFIED
    ]
    assert undeclared == []


def test_the_gdpr_and_gate_check_roles_are_as_documented() -> None:
    assert required_role("/c360.gate.v1.Gate/Check") == common_pb2.ROLE_WRITE
    assert required_role("/c360.profile.v1.Profile/Get") == common_pb2.ROLE_READ
    assert required_role("/c360.gdpr.v1.Gdpr/Erase") == common_pb2.ROLE_GDPR
    assert required_role("/c360.gate.v1.Gate/PutShopPolicy") == common_pb2.ROLE_ADMIN


def test_admin_holds_every_role_and_others_only_theirs() -> None:
    admin = Principal("ops", frozenset({"*"}), frozenset({common_pb2.ROLE_ADMIN}))
    reader = Principal("r", frozenset({"a"}), frozenset({common_pb2.ROLE_READ}))
    assert all(admin.has_role(r) for r in (common_pb2.ROLE_READ, common_pb2.ROLE_GDPR))
    assert reader.has_role(common_pb2.ROLE_READ)
    assert not reader.has_role(common_pb2.ROLE_WRITE)
    assert not reader.has_role(common_pb2.ROLE_GDPR)


def test_shop_scope_is_exact_unless_every_shop() -> None:
    agency = Principal("agency", frozenset({"a", "b"}), frozenset({common_pb2.ROLE_READ}))
    everyone = Principal("ops", frozenset({"*"}), frozenset({common_pb2.ROLE_ADMIN}))
    assert agency.may_access("a")
    assert agency.may_access("b")
    assert not agency.may_access("c")
    assert not agency.may_access("A")
    assert everyone.may_access("any-shop")


def test_the_registry_finds_configured_and_development_tokens_only() -> None:
    registry = TokenRegistry.from_settings_tokens(
        [TokenConfig(name="journeys", token=SecretStr("t1"), shops=["a"], roles=["read"])],
        dev_token=SecretStr("dev"),
    )
    journeys = registry.principal("t1")
    dev = registry.principal("dev")
    assert journeys == Principal("journeys", frozenset({"a"}), frozenset({common_pb2.ROLE_READ}))
    assert dev == Principal("dev", frozenset({"*"}), frozenset({common_pb2.ROLE_ADMIN}))
    assert registry.principal("t2") is None
    assert registry.principal("") is None
