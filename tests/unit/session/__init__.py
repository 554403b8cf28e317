"""Tests of ``agent.session``."""
