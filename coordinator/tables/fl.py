"""Registry tables: fl (none yet)."""

from __future__ import annotations
