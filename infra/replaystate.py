"""A ``protocol.fl.ReplayGuard`` kept in a file, so a replay after a restart is refused too.

Used by the FL client (instructions) and the prediction-log request gate: both verify a signed
envelope, then remember its message id until it expires. The file is small (the guard is
bounded), read once at start-up and replaced atomically after every accepted message. A file
that cannot be read starts an empty guard with one WARNING line: the envelopes' expiry still
bounds what could be replayed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgefleet.protocol import fl
from edgefleet.protocol.errors import DecodeError

from .fsutil import atomic_write

__all__ = ["load_guard", "save_guard"]

log = logging.getLogger(__name__)
MAX_STATE = 1 << 20  # bytes read of a state file


def load_guard(path: Path | None, *, now: int, what: str) -> fl.ReplayGuard:
    """The guard stored at ``path`` (entries expired by ``now`` dropped), or an empty one."""
    if path is None or not path.exists():
        return fl.ReplayGuard()
    try:
        d = json.loads(path.read_bytes()[:MAX_STATE])
        if not isinstance(d, dict):
            raise DecodeError("not a JSON object")
        return fl.ReplayGuard.from_dict(d, now=now)
    except (OSError, ValueError, DecodeError) as exc:
        log.warning("%s: replay state %s unreadable (%s): starting empty", what, path, exc)
        return fl.ReplayGuard()


def save_guard(path: Path | None, guard: fl.ReplayGuard, *, what: str) -> None:
    """Replace the state at ``path`` atomically; a failure is logged (the guard in memory
    still holds; only a restart would forget)."""
    if path is None:
        return
    data = json.dumps(guard.to_dict(), separators=(",", ":"), sort_keys=True).encode()
    try:
        atomic_write(path, data, mode=0o600)
    except OSError as exc:
        log.warning("%s: cannot save the replay state %s: %s", what, path, exc)
