"""Registry tables beyond the baseline, one module per feature, all on ``Base.metadata``.

Importing this package registers every table (``registry.py`` does, so Alembic's
``target_metadata`` and the models-vs-revisions test see them all). A table added here needs a
revision in ``migrations/versions``.
"""

from __future__ import annotations

from . import candidates, console, drift, rollouts, shards, telemetry  # noqa: F401
from .base import Base

__all__ = ["Base"]
