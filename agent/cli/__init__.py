"""The ``agent`` command line, thin over the library: one module per group of commands.

``app`` holds the group, ``main`` and the one place that maps error classes to exit
codes. Add a command in the module of its group and register it on ``app.cli``.

May import: ``agent.agentd``, ``agent.session`` and everything below them. Never ``agent.qt``.
"""

from agent.cli.app import main

__all__ = ["main"]
