"""Registry tables: candidates (none yet)."""

from __future__ import annotations
