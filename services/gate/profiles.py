"""The profile service as the gate's source of contact policies for customers it has none for."""

import grpc

from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from services.gate.counters import ContactPolicy
from services.runtime.validation import CHANNEL_NAMES


class ProfilePolicies:
    """Pulls contact policies from the profile service (GetContactPolicies)."""

    def __init__(self, stub: "profile_pb2_grpc.ProfileAsyncStub") -> None:
        self._stub = stub

    async def __call__(self, shop_id: str, person_ids: list[str]) -> dict[str, ContactPolicy]:
        try:
            answer = await self._stub.GetContactPolicies(
                profile_pb2.GetContactPoliciesRequest(shop_id=shop_id, person_ids=person_ids)
            )
        except grpc.aio.AioRpcError as error:
            raise ConnectionError(f"profile: {error.code().name}") from error
        return {
            policy.person_id: ContactPolicy(
                granted=frozenset(
                    CHANNEL_NAMES[c.channel]
                    for c in policy.consents
                    if c.granted and c.channel in CHANNEL_NAMES
                ),
                global_unsubscribe=policy.global_unsubscribe,
                version=policy.version,
            )
            for policy in answer.policies
        }
