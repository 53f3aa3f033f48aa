"""OpenTelemetry traces: one trace per call (Pipecat's ``conversation`` span) with a span
per turn, exported over OTLP when the deployment asks for it.

Switched on by ``PIPESWITCH_TRACING=true`` or by the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``
(the exporter also reads ``OTEL_EXPORTER_OTLP_HEADERS`` etc. itself). The SDK and the
exporter are the optional ``[otel]`` extra; without them tracing stays off with one
warning, and calls are unaffected. An application (or a test) that installed its own SDK
``TracerProvider`` keeps it.
"""

from __future__ import annotations

import os
from typing import Any

from loguru import logger

from pipeswitch.config.settings import Settings

_configured = False


def tracing_wanted(settings: Settings) -> bool:
    """Whether calls should be traced in this deployment."""
    return bool(settings.tracing or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup_tracing(settings: Settings, exporter: Any = None) -> bool:
    """Install the OTLP exporter once per process; True when calls will be traced."""
    global _configured
    if not tracing_wanted(settings):
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning("tracing asked for, but the [otel] extra is not installed; tracing off")
        return False
    if _configured or isinstance(trace.get_tracer_provider(), TracerProvider):
        return True  # ours from an earlier start, or the application's own
    if exporter is None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            logger.warning("tracing asked for, but no OTLP exporter is installed; tracing off")
            return False
        exporter = OTLPSpanExporter()  # endpoint and headers from OTEL_EXPORTER_OTLP_*
    provider = TracerProvider(
        resource=Resource.create(
            {
                "service.name": os.environ.get("OTEL_SERVICE_NAME", "pipeswitch"),
                "service.instance.id": f"{os.uname().nodename}:{os.getpid()}",
            }
        )
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured = True
    logger.info(
        "tracing on: OTLP to {}", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "the default")
    )
    return True
