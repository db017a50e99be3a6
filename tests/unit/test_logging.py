"""Logs are JSON, one object a line, carrying the service and the trace id."""

import json
import logging

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

from services.runtime.telemetry import configure_logging, telemetry_from_environment


def test_a_log_line_is_json_with_service_and_trace_ids(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("gate", "INFO")
        tracer = TracerProvider().get_tracer("test")
        with tracer.start_as_current_span("work") as span:
            logging.getLogger("c360.test").info("decided", extra={"rpc.code": "OK"})
        untraced = logging.getLogger("c360.test")
        untraced.debug("hidden below INFO")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    context = span.get_span_context()
    assert record["message"] == "decided"
    assert record["service"] == "gate"
    assert record["level"] == "INFO"
    assert record["logger"] == "c360.test"
    assert record["rpc.code"] == "OK"
    assert record["trace_id"] == format(context.trace_id, "032x")
    assert record["span_id"] == format(context.span_id, "016x")
    assert record["time"].endswith("+00:00")


@pytest.mark.parametrize(
    ("environment", "recording"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, True),
    ],
)
def test_spans_are_recorded_only_when_exported_or_asked_for(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], recording: bool
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    telemetry = telemetry_from_environment("gate")
    span = telemetry.tracer("test").start_span("work")
    assert span.is_recording() is recording
    assert isinstance(span, ReadableSpan) is recording
    span.end()
    telemetry.tracer_provider.shutdown()
    # Unrecorded, the span still has ids for the logs and the peers it calls.
    assert span.get_span_context().is_valid
