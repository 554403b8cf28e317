"""The library's loggers follow the host's structlog, or stdlib logging (issue 20)."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from agent.log import get_logger


def test_unconfigured_structlog_sends_the_library_events_to_stdlib_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no structlog configuration the event is a stdlib record of the module's logger."""
    assert not structlog.is_configured()
    with caplog.at_level(logging.INFO, logger="agent.probe"):
        get_logger("agent.probe").bind(session_id="s1").info("probe_event", path="a.txt")
    assert ["agent.probe"] == [r.name for r in caplog.records]
    assert "event='probe_event'" in caplog.records[0].getMessage()
    assert "session_id='s1'" in caplog.records[0].getMessage()
    assert not structlog.is_configured(), "logging an event configured structlog"


def test_a_host_structlog_configuration_gets_the_library_events() -> None:
    """Once the host configured structlog, the library's events go through it."""
    with capture_logs() as logs:
        get_logger("agent.probe").bind(session_id="s1").warning("probe_event", n=2)
    assert [{"event": "probe_event", "session_id": "s1", "n": 2, "log_level": "warning"}] == logs


def test_a_host_pipeline_that_raises_does_not_break_the_library(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host processor that cannot take our event: the event goes the stdlib way."""

    def refuse(_logger: Any, _name: str, _event: MutableMapping[str, Any]) -> Any:
        raise KeyError("host processor wants a key we do not send")

    structlog.configure(processors=[refuse, structlog.processors.KeyValueRenderer()])
    with caplog.at_level(logging.WARNING, logger="agent.probe"):
        get_logger("agent.probe").exception("probe_failed")
    assert ["probe_failed"] == [
        r.getMessage().split("'")[1] for r in caplog.records if r.name == "agent.probe"
    ]
