"""Tests of ``agent.folder``."""
