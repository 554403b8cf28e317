"""Tests of ``agent.stage``."""
