"""Tests of ``agent.qt``."""
