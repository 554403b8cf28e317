"""Tests of ``agent.cli``."""
