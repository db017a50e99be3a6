"""OpenTelemetry tracing (exporter from the standard OTEL_* variables) and JSON logs."""

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from pythonjsonlogger.json import JsonFormatter


@dataclass
class Telemetry:
    """The tracer and meter providers a process uses, handed to its servers and services."""

    tracer_provider: TracerProvider = field(default_factory=TracerProvider)
    meter_provider: MeterProvider = field(default_factory=MeterProvider)

    def tracer(self, name: str) -> trace.Tracer:
        """The tracer of an instrumenting module (services.runtime.interceptors' server spans)."""
        return self.tracer_provider.get_tracer(name)

    def client_interceptors(self) -> list[Any]:
        """OpenTelemetry gRPC client interceptors: a span per call, W3C context into metadata."""
        return list(aio_client_interceptors(tracer_provider=self.tracer_provider))  # type: ignore[no-untyped-call]

    def shutdown(self) -> None:
        """Flushes and stops the span processors and metric readers."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _metric_exporter(name: str) -> MetricExporter | None:
    if name == "none":
        return None
    if name == "console":
        return ConsoleMetricExporter()
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    raise ValueError(f"OTEL_METRICS_EXPORTER={name!r} is not supported (none, console, otlp)")


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
    """Tracing and metrics as the standard variables ask: OTEL_TRACES_EXPORTER and
    OTEL_METRICS_EXPORTER (none by default, console, otlp with OTEL_EXPORTER_OTLP_*),
    OTEL_TRACES_SAMPLER (spans are not recorded when none is exported and no sampler is set),
    OTEL_METRIC_EXPORT_INTERVAL, and OTEL_SERVICE_NAME (default c360-<service>)."""
    resource = Resource.create(
        {SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", f"c360-{service}")}
    )
    names = os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",")
    exporters = [(name, e) for name in names if (e := _exporter(name.strip())) is not None]
    # Nothing exports spans: record none (they still carry trace ids, for the logs and peers),
    # unless OTEL_TRACES_SAMPLER says otherwise. A recorded span costs a call ~15 µs of CPU.
    sampler = ALWAYS_OFF if not exporters and "OTEL_TRACES_SAMPLER" not in os.environ else None
    provider = TracerProvider(resource=resource, sampler=sampler)
    for name, exporter in exporters:
        processor = SimpleSpanProcessor if name == "console" else BatchSpanProcessor
        provider.add_span_processor(processor(exporter))
    readers: list[MetricReader] = []
    for name in os.environ.get("OTEL_METRICS_EXPORTER", "none").split(","):
        metric_exporter = _metric_exporter(name.strip())
        if metric_exporter is not None:
            readers.append(PeriodicExportingMetricReader(metric_exporter))
    return Telemetry(provider, MeterProvider(resource=resource, metric_readers=readers))


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
