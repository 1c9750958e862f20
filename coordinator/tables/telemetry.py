"""Registry tables: telemetry (none yet)."""

from __future__ import annotations
