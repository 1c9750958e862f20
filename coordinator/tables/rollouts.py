"""Registry tables: rollouts (none yet)."""

from __future__ import annotations
