"""Tests of ``agent.store``."""
