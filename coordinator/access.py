"""Who may do what: API tokens with roles, and the append-only audit log.

Roles, least privilege first: ``viewer`` reads every view; ``deployer`` also changes what runs
(releases, rollouts, groups, FL runs); ``admin`` also changes who is in the fleet (enroll,
revoke). Tokens are made and revoked only from the CLI on the coordinator's host
(``edgefleet token create|revoke|list``): the API cannot mint or widen its own credentials.

A token is ``eft_<id>.<secret>``: ``id`` (16 hex digits) names the row, ``secret`` is 32 random
bytes (URL-safe base64). Only SHA-256(secret) is stored; the secret is printed once. A plain
hash is enough for 256 random bits (no password to guess, so no slow KDF), and the comparison
is constant-time. Every state change, allowed or refused, is one inserted ``audit_log`` row:
who (token name, role), what (action, target), when, from where, and the result.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from .registry import Registry
from .tables.console import ApiToken, AuditEntry

__all__ = [
    "ACTIONS",
    "ROLES",
    "AccessError",
    "Principal",
    "allowed",
    "audit",
    "audit_log",
    "authenticate",
    "create_token",
    "list_tokens",
    "revoke_token",
]

ROLES = ("viewer", "deployer", "admin")  # each role may do everything the ones before it may

#: the least role each action needs
ACTIONS: dict[str, str] = {
    "view": "viewer",
    "release": "deployer",
    "candidate.drop": "deployer",
    "model.register": "deployer",
    "group.add": "deployer",
    "rollout.start": "deployer",
    "rollout.pause": "deployer",
    "rollout.resume": "deployer",
    "rollout.abort": "deployer",
    "rollout.rollback": "deployer",
    "fl.start": "deployer",
    "fl.stop": "deployer",
    "audit.read": "deployer",
    "device.enroll": "admin",
    "device.revoke": "admin",
}

_TOKEN = re.compile(r"eft_([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9@._-]{0,63}")
MAX_TEXT = 256  # audit target/result text is cut to this


class AccessError(ValueError):
    """A bad token request (unknown role, bad name, no such token): one line for the user."""


@dataclass(frozen=True)
class Principal:
    """Who is asking: a token's name and role (``cli`` for the local operator)."""

    name: str
    role: str

    def may(self, action: str) -> bool:
        return allowed(self.role, action)


def allowed(role: str, action: str) -> bool:
    """May ``role`` do ``action``? Unknown roles and actions may nothing."""
    need = ACTIONS.get(action)
    if need is None or role not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(need)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def create_token(
    registry: Registry, *, name: str, role: str, by: str, now: int | None = None
) -> str:
    """A new token for ``name`` with ``role``; returns the token text (shown once)."""
    if role not in ROLES:
        raise AccessError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if not _NAME.fullmatch(name):
        raise AccessError(f"token name {name!r}: 1-64 letters, digits, '@._-'")
    token_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    with registry.session() as s:
        s.add(
            ApiToken(
                token_id=token_id,
                name=name,
                role=role,
                digest=_digest(secret),
                created=int(time.time()) if now is None else now,
                created_by=by[:64],
                revoked=None,
            )
        )
    return f"eft_{token_id}.{secret}"


def revoke_token(registry: Registry, token_id: str, *, now: int | None = None) -> None:
    """Revoke a token by its id (the 16 hex digits after ``eft_``); revoked at once."""
    with registry.session() as s:
        done = s.execute(
            update(ApiToken)
            .where(ApiToken.token_id == token_id, ApiToken.revoked.is_(None))
            .values(revoked=int(time.time()) if now is None else now)
        )
        if not done.rowcount:  # type: ignore[attr-defined]
            raise AccessError(f"no active token {token_id!r} (see `edgefleet token list`)")


def list_tokens(registry: Registry) -> Sequence[ApiToken]:
    with registry.session() as s:
        return s.scalars(select(ApiToken).order_by(ApiToken.created, ApiToken.token_id)).all()


def authenticate(registry: Registry, bearer: str) -> Principal | None:
    """The principal of a valid, unrevoked token; None for anything else."""
    m = _TOKEN.fullmatch(bearer)
    if m is None:
        return None
    with registry.session() as s:
        row = s.get(ApiToken, m.group(1))
        if row is None or row.revoked is not None:
            return None
        if not hmac.compare_digest(row.digest, _digest(m.group(2))):
            return None
        return Principal(name=row.name, role=row.role)


def audit(
    registry: Registry,
    who: Principal,
    *,
    action: str,
    target: str,
    source: str,
    result: str,
    detail: dict[str, Any] | None = None,
    now: int | None = None,
) -> None:
    """Append one audit row (never updated, never deleted)."""
    with registry.session() as s:
        s.add(
            AuditEntry(
                time=int(time.time()) if now is None else now,
                actor=who.name[:64],
                role=who.role[:16],
                action=action[:64],
                target=target[:MAX_TEXT],
                source=source[:64],
                result=result[:MAX_TEXT],
                detail=detail or {},
            )
        )


def audit_log(
    registry: Registry, *, since: int = 0, limit: int = 200, action: str | None = None
) -> list[AuditEntry]:
    """Audit rows at or after ``since``, newest first, at most ``limit`` (1-10,000)."""
    limit = max(1, min(limit, 10_000))
    with registry.session() as s:
        q = select(AuditEntry).where(AuditEntry.time >= since)
        if action:
            q = q.where(AuditEntry.action == action)
        return list(s.scalars(q.order_by(AuditEntry.id.desc()).limit(limit)).all())
