"""OpenTelemetry tracing (exporter from the standard OTEL_* variables) and JSON logs."""

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from pythonjsonlogger.json import JsonFormatter


@dataclass
class Telemetry:
    """The tracer provider a process uses, handed to its servers and channels."""

    tracer_provider: TracerProvider = field(default_factory=TracerProvider)

    def server_interceptor(self) -> Any:
        """The OpenTelemetry gRPC server interceptor: a span per call, parent from metadata."""
        return aio_server_interceptor(tracer_provider=self.tracer_provider)  # type: ignore[no-untyped-call]

    def client_interceptors(self) -> list[Any]:
        """OpenTelemetry gRPC client interceptors: a span per call, W3C context into metadata."""
        return list(aio_client_interceptors(tracer_provider=self.tracer_provider))  # type: ignore[no-untyped-call]

    def shutdown(self) -> None:
        """Flushes and stops the span processors."""
        self.tracer_provider.shutdown()


def _exporter(name: str) -> SpanExporter | None:
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported (none, console, otlp)")


def telemetry_from_environment(service: str) -> Telemetry:
    """Tracing as the standard variables ask: OTEL_TRACES_EXPORTER (none by default, console,
    otlp with OTEL_EXPORTER_OTLP_*) and OTEL_SERVICE_NAME (default c360-<service>)."""
    resource = Resource.create(
        {SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", f"c360-{service}")}
    )
    provider = TracerProvider(resource=resource)
    for name in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(","):
        exporter = _exporter(name.strip())
        if exporter is not None:
            processor = SimpleSpanProcessor if name == "console" else BatchSpanProcessor
            provider.add_span_processor(processor(exporter))
    return Telemetry(provider)


class TraceContextFilter(logging.Filter):
    """Adds the current trace and span ids to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else None
        record.span_id = format(context.span_id, "016x") if context.is_valid else None
        return True


def configure_logging(service: str, level: str) -> None:
    """JSON logs on stderr, one object a line, with service, trace id and span id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(
        JsonFormatter(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
            static_fields={"service": service},
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
