"""Fixtures shared by the integration tests (real stores: the folder store, SeaweedFS, moto)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, load_config
from agent.session import PlantDesignSession
from agent.store.base import ObjectStore
from tests.integration.bucket import direct, moto_truth, ranged_store, truth, via_proxy

__all__ = [
    "direct",
    "moto_truth",
    "ranged_store",
    "truth",
    "via_proxy",
]  # fixtures of tests.integration.bucket, for all

MakeSession = Callable[..., PlantDesignSession]
"""``make_session("bob", watch={...})``: a session on the test's store for one machine."""


@pytest.fixture
def make_session(store: ObjectStore, tmp_path: Path) -> MakeSession:
    """Sessions sharing one store; each ``machine`` gets its own base folder."""

    def make(machine: str = "m1", **sections: Any) -> PlantDesignSession:
        config: AgentConfig = load_config(
            paths={"base_dir": str(tmp_path / machine)},
            lock={"heartbeat_interval": 3600, "stale_after": 7200},
            **sections,
        )
        return PlantDesignSession(config, store=store)

    return make
