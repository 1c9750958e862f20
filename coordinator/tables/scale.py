"""Registry tables: scale (none yet)."""

from __future__ import annotations
