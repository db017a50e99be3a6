"""Bearer tokens bound to shops and roles, enforced for every c360 method in one place."""

import contextvars
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pool
from pydantic import SecretStr

from c360.common.v1 import common_pb2
from services.runtime.errors import InvalidArgument, PermissionDenied, Unauthenticated
from services.runtime.settings import RuntimeSettings, TokenConfig

ALL_SHOPS = "*"
ROLES = {
    "read": common_pb2.ROLE_READ,
    "write": common_pb2.ROLE_WRITE,
    "gdpr": common_pb2.ROLE_GDPR,
    "admin": common_pb2.ROLE_ADMIN,
}


@dataclass(frozen=True)
class Principal:
    """The holder of a valid token: its name, the shops it may touch and its roles."""

    name: str
    shops: frozenset[str]
    roles: frozenset[common_pb2.Role.ValueType]

    def may_access(self, shop_id: str) -> bool:
        """Whether the token is bound to this shop (or to every shop)."""
        return ALL_SHOPS in self.shops or shop_id in self.shops

    def has_role(self, role: common_pb2.Role.ValueType) -> bool:
        """Whether the token holds the role; admin holds every role."""
        return role in self.roles or common_pb2.ROLE_ADMIN in self.roles


# The principal of the call being served, for servicers that check shops of stored resources.
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenRegistry:
    """Known tokens, held by digest so that lookups never compare secrets directly."""

    def __init__(self, principals: Iterable[tuple[str, Principal]]) -> None:
        self._by_digest = {_digest(token): principal for token, principal in principals}

    @classmethod
    def from_settings_tokens(
        cls, tokens: Iterable[TokenConfig], dev_token: SecretStr | None = None
    ) -> "TokenRegistry":
        """The configured tokens, plus the development token (admin, every shop) when set."""
        entries = [
            (
                t.token.get_secret_value(),
                Principal(t.name, frozenset(t.shops), frozenset(ROLES[r] for r in t.roles)),
            )
            for t in tokens
        ]
        if dev_token is not None:
            entries.append(
                (
                    dev_token.get_secret_value(),
                    Principal("dev", frozenset({ALL_SHOPS}), frozenset({common_pb2.ROLE_ADMIN})),
                )
            )
        return cls(entries)

    @classmethod
    def from_settings(cls, settings: RuntimeSettings) -> "TokenRegistry":
        """The tokens of C360_TOKENS, plus C360_DEV_TOKEN when set."""
        return cls.from_settings_tokens(settings.tokens, settings.dev_token)

    def principal(self, token: str) -> Principal | None:
        """Who holds the token, or None for an unknown one."""
        return self._by_digest.get(_digest(token))


def _options(method: str) -> Any:
    full_name = method.lstrip("/").replace("/", ".")
    return descriptor_pool.Default().FindMethodByName(full_name).GetOptions()


def required_role(method: str) -> common_pb2.Role.ValueType:
    """The role a c360 method declares with the `required_role` option (UNSPECIFIED if none)."""
    role: common_pb2.Role.ValueType = _options(method).Extensions[common_pb2.required_role]
    return role


def every_shop(method: str) -> bool:
    """Whether a c360 method takes an empty shop_id to mean every shop (`every_shop`)."""
    return bool(_options(method).Extensions[common_pb2.every_shop])


def bearer_token(metadata: Mapping[str, str | bytes]) -> str | None:
    """The bearer token in a call's `authorization` metadata."""
    value = metadata.get("authorization")
    if isinstance(value, str):
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def shops_of(request: Any) -> list[str] | None:
    """The shop ids a request is about, or None when its message names no shop."""
    fields = request.DESCRIPTOR.fields_by_name
    if "shop_id" in fields:
        return [request.shop_id]
    if "shop_ids" in fields:
        return list(request.shop_ids)
    return None


def authenticate(
    tokens: TokenRegistry,
    metadata: Mapping[str, str | bytes],
    method: str,
    role: common_pb2.Role.ValueType,
) -> Principal:
    """The caller, who must hold a known token with the method's role.

    UNAUTHENTICATED without a valid token; PERMISSION_DENIED without the role.
    """
    token = bearer_token(metadata)
    if token is None:
        raise Unauthenticated("missing bearer token in `authorization` metadata")
    principal = tokens.principal(token)
    if principal is None:
        raise Unauthenticated("unknown bearer token")
    if role == common_pb2.ROLE_UNSPECIFIED or not principal.has_role(role):
        raise PermissionDenied(
            "MISSING_ROLE",
            f"the token lacks the {common_pb2.Role.Name(role)} role for {method}",
            role=common_pb2.Role.Name(role),
        )
    return principal


def check_shops(principal: Principal, request: Any, all_shops: bool = False) -> None:
    """Every shop a request names must be one the caller's token is bound to; with `all_shops`
    (a method marked every_shop) an empty shop id means every shop, for a token bound to all."""
    shops = shops_of(request)
    if shops is None:
        return
    if all_shops and shops == [""]:
        if ALL_SHOPS not in principal.shops:
            raise PermissionDenied(
                "OTHER_SHOP", "only a token bound to every shop may ask for every shop"
            )
        return
    if not shops or any(not shop for shop in shops):
        raise InvalidArgument([("shop_id", "required")])
    for shop in shops:
        if not principal.may_access(shop):
            raise PermissionDenied(
                "OTHER_SHOP", "the token is not bound to this shop", shop_id=shop
            )
