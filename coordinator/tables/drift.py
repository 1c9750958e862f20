"""Registry tables: drift (none yet)."""

from __future__ import annotations
