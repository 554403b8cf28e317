"""Tests of ``agent.agentd``."""
