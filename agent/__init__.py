"""pd-session-agent: check-out / check-in of plant-design project stages in S3/R2.

The public names are re-exported here; ``tests/unit/test_public_api.py`` pins them.
The session machinery is imported on first use, so ``import agent`` (and
``agent status`` / ``--help``) stays cheap: no boto3, no watchdog, and no structlog
before the first event is logged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig, load_config
from agent.errors import (
    AgentError,
    ConfigError,
    ConflictError,
    LockError,
    LockHeldError,
    LockLostError,
    PreviousCrashError,
    SessionCancelledError,
    SessionError,
    StoreError,
    UnsavedWorkError,
)
from agent.log import library_defaults
from agent.state import SessionState
from agent.version import __version__

if TYPE_CHECKING:
    from agent.session import CloseReport, PlantDesignSession

__all__ = [
    "AgentConfig",
    "AgentError",
    "CloseReport",
    "ConfigError",
    "ConflictError",
    "LockError",
    "LockHeldError",
    "LockLostError",
    "PlantDesignSession",
    "PreviousCrashError",
    "SessionCancelledError",
    "SessionError",
    "SessionState",
    "StoreError",
    "UnsavedWorkError",
    "__version__",
    "load_config",
]

_LAZY = {"PlantDesignSession", "CloseReport"}

library_defaults()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from agent import session

        return getattr(session, name)
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
