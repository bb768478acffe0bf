"""Which log records reach Application Insights.

In Azure the Python worker exports logs itself (`PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true`):
before it imports `function_app.py` it calls the Azure Monitor distro's `configure_azure_monitor()`
with the logger name of `PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME`, by default the root logger, so
an OpenTelemetry `LoggingHandler` on the root exports every logger of the process at the worker's
level (Information). That includes the Azure SDK's HTTP logging policy (one record per request and
per response, with their headers), MSAL, httpx, urllib3 and the exporter's own records about the
telemetry it sends. `configure_logging()` keeps those out unless they are warnings or worse, and
keeps the app's own loggers (`shared.*`, `function_app`) at Information, where its structured
events (`extra={"event": …}`) are.

Only levels are set: nothing here reads a setting or the environment, and with no exporter
attached (tests, `func start` without the setting) the third-party loggers are left alone.
"""

from __future__ import annotations

import logging

APP_LOGGERS = ("shared", "function_app")
"""The app's own loggers (`logging.getLogger(__name__)` in `shared/` and `function_app.py`)."""

QUIET_LOGGERS = (
    "azure",                                              # every Azure SDK client, azure.functions
    "azure.core.pipeline.policies.http_logging_policy",   # one record per request and per response
    "azure.identity",
    "azure.monitor.opentelemetry.exporter",               # the exporter reporting on its own uploads
    "msal",
    "httpx",
    "httpcore",
    "urllib3",
)
"""Exported only from WARNING up. Child loggers are listed too, so a level set on one of them
elsewhere (e.g. to INFO) is put back."""

APP_LEVEL = logging.INFO
QUIET_LEVEL = logging.WARNING


def exporting(logger: logging.Logger | None = None) -> bool:
    """Whether an OpenTelemetry logging handler (the worker's export to Application Insights) is
    attached to `logger` (default: the root logger)."""
    logger = logger or logging.getLogger()
    return any(type(handler).__name__ == "LoggingHandler" and type(handler).__module__.startswith("opentelemetry")
               for handler in logger.handlers)


def configure_logging() -> bool:
    """Set the levels above. Called once, when `function_app` is imported; safe to call again.
    Returns whether an exporter was found (and the third-party loggers were quieted)."""
    for name in APP_LOGGERS:
        logging.getLogger(name).setLevel(APP_LEVEL)
    if not exporting():
        return False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(QUIET_LEVEL)
    return True
