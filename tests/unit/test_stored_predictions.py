"""The JSON the profile stores of a person's predictions is what MessageToDict makes of them."""

import json

from google.protobuf.json_format import MessageToDict
from hypothesis import given
from hypothesis import strategies as st

from c360.profile.v1 import profile_pb2
from services.profile.servicer import stored_predictions

probability = st.floats(0, 1)


@st.composite
def predictions(draw: st.DrawFn) -> profile_pb2.Predictions:
    p = profile_pb2.Predictions(
        lifecycle_stage=draw(st.sampled_from(["", "new", "loyal", "churned"])),
        historical_ltv=draw(st.sampled_from(["", "0.00", "136.50"])),
        predicted_ltv_90d=draw(st.sampled_from(["", "12.34"])),
        next_order_overdue=draw(st.booleans()),
        products_due=draw(st.lists(st.text(max_size=5), max_size=3)),
    )
    if draw(st.booleans()):
        p.rfm.r, p.rfm.f, p.rfm.m = draw(st.tuples(*[st.integers(0, 5)] * 3))
    for name in ("churn_risk", "p_order_30d", "p_order_90d"):
        if draw(st.booleans()):
            setattr(p, name, draw(probability))
    if draw(st.booleans()):
        p.predicted_next_order_at.seconds = draw(st.integers(-62135596800, 253402300799))
        p.predicted_next_order_at.nanos = draw(st.sampled_from([0, 1000, 500_000_000]))
    return p


@given(predictions())
def test_stored_predictions_are_message_to_dict_field_for_field_and_in_order(
    p: profile_pb2.Predictions,
) -> None:
    expected = MessageToDict(p, preserving_proto_field_name=True)
    assert json.dumps(stored_predictions(p)) == json.dumps(expected)
