"""The agent's version: one place, so every layer can name it without importing ``agent``."""

from __future__ import annotations

__version__ = "0.1.0"
