"""The operator's state changes, one function each, audited: what the CLI and the HTTP API call.

Each takes the ``Principal`` asking (a token's name and role for the API; ``cli:<user>`` as
admin for a command run on the coordinator's host, whose file permissions already decide who
may run it) and where the request came from. Each checks the role (``access.allowed``), runs,
and appends one audit row with the result: ``ok``, ``refused: <why>`` (role), or
``failed: <error>`` (the error is re-raised for the caller to report). Read-only views are not
audited.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgefleet.infra.link.port import Link
from edgefleet.protocol.device import DevicePublic

from . import access
from .access import Principal
from .home import Coordinator
from .registry import Device, ModelVersion
from .release import Released, release

__all__ = [
    "Forbidden", "audited", "cli_principal", "enroll", "group_add", "publish_release",
    "register_model", "require", "revoke",
    "drop_candidate", "publish_candidate", "rollout_control", "rollout_rollback",
    "rollout_start",
]

if TYPE_CHECKING:
    from edgefleet.protocol.candidate import CandidateSpec

    from .candidates import Candidate
    from .rollout import Decision, RolloutSpec
    from .rollouts import Rollout

T = TypeVar("T")


class Forbidden(PermissionError):
    """The principal's role may not do this (HTTP 403)."""


def cli_principal() -> Principal:
    """The local operator: whoever can read the coordinator's home runs as admin."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = "unknown"
    return Principal(name=f"cli:{user}"[:64], role="admin")


def require(c: Coordinator, who: Principal, action: str, target: str, source: str) -> None:
    """``Forbidden`` (and its audit row) unless ``who``'s role may do ``action``: for a caller
    that must refuse before it starts the work it audits later (a background operation, an
    upload it decodes first)."""
    if not who.may(action):
        why = f"refused: role {who.role} may not {action}"
        access.audit(c.registry, who, action=action, target=target, source=source, result=why)
        raise Forbidden(f"{why} (needs {access.ACTIONS.get(action, 'an unknown action')})")


def audited(
    c: Coordinator,
    who: Principal,
    action: str,
    target: str,
    source: str,
    run: Callable[[], T],
    detail: Callable[[T], dict[str, Any]] | None = None,
) -> T:
    """Check ``who`` may do ``action``, run it, and record the outcome either way."""
    require(c, who, action, target, source)
    try:
        out = run()
    except Exception as exc:
        access.audit(
            c.registry, who, action=action, target=target, source=source,
            result=f"failed: {exc}",
        )  # fmt: skip
        raise
    access.audit(
        c.registry, who, action=action, target=target, source=source, result="ok",
        detail=detail(out) if detail else None,
    )  # fmt: skip
    return out


def register_model(
    c: Coordinator,
    who: Principal,
    source: str,
    name: str,
    path: Path,
    *,
    version: str | None = None,
    meta_path: Path | None = None,
    reference_stats: dict[str, Any] | None = None,
) -> ModelVersion:
    """Register a model file (checked: the agent can serve it, its metadata describes it)."""
    return audited(
        c, who, "model.register", f"{name}@{version or 'next'}", source,
        lambda: c.register_model(name, path, version=version, meta_path=meta_path,
                                 reference_stats=reference_stats),
        lambda mv: {"version": mv.version, "format": mv.format, "size": mv.size},
    )  # fmt: skip


def group_add(
    c: Coordinator, who: Principal, source: str, group: str, device_ids: Sequence[str]
) -> None:
    audited(
        c, who, "group.add", f"group:{group}", source,
        lambda: c.registry.add_to_group(group, list(device_ids)),
    )  # fmt: skip


def enroll(
    c: Coordinator, who: Principal, source: str, public: DevicePublic, groups: Sequence[str] = ()
) -> Device:
    def run() -> Device:
        d = c.enroll(public)
        for g in groups:
            c.registry.add_to_group(g, [public.device_id])
        return d

    return audited(c, who, "device.enroll", f"device:{public.device_id}", source, run)


def revoke(c: Coordinator, who: Principal, source: str, device_id: str) -> None:
    audited(c, who, "device.revoke", f"device:{device_id}", source, lambda: c.revoke(device_id))


def publish_release(
    c: Coordinator,
    who: Principal,
    source: str,
    link: Link,
    name: str,
    version: str,
    selector: str,
) -> Released:
    """Build and publish a release (``release.release``), audited."""
    return audited(
        c, who, "release", f"{name}@{version} to {selector}", source,
        lambda: release(c, link, name, version, selector),
        lambda done: {"sequence": done.sequence, "targets": len(done.targets)},
    )  # fmt: skip


def publish_candidate(
    c: Coordinator,
    who: Principal,
    source: str,
    link: Link,
    name: str,
    version: str,
    selector: str,
    spec: CandidateSpec,
) -> tuple[Candidate, int]:
    """Build and publish a shadow / A/B candidate release, audited as a release; returns the
    candidate and the bytes of offers sent."""
    from .candidates import build_candidate
    from .candidates import publish_candidate as publish

    def run() -> tuple[Candidate, int]:
        cand = build_candidate(c, name, version, selector, spec)
        return cand, publish(link, cand)

    return audited(
        c, who, "release", f"{name}@{version} to {selector} (candidate {spec.mode})", source,
        run, lambda out: {"sequence": out[0].sequence, "candidate": spec.mode,
                          "share": spec.share, "targets": len(out[0].targets)},
    )  # fmt: skip


def drop_candidate(c: Coordinator, who: Principal, source: str, link: Link, selector: str
                   ) -> int:  # fmt: skip
    """Stop the candidate on the selected devices (their active models are unchanged),
    audited; returns how many devices were told."""
    from .candidates import clear_candidate

    def run() -> int:
        devices = c.registry.resolve(selector)
        if not devices:
            raise LookupError(f"selector {selector!r} matches no enrolled device")
        return clear_candidate(link, devices)

    return audited(c, who, "candidate.drop", selector, source, run,
                   lambda n: {"devices": n})  # fmt: skip


def rollout_control(c: Coordinator, who: Principal, source: str, rollout_id: int,
                    what: str) -> Rollout:  # fmt: skip
    """Pause, resume or abort a rollout (``what``); returns it in its new state."""
    from .rollouts import Rollouts

    if what not in ("pause", "resume", "abort"):
        raise ValueError(f"unknown rollout operation {what!r}")
    ro = Rollouts(c, None)
    done: Rollout = audited(c, who, f"rollout.{what}", f"rollout:{rollout_id}", source,
                            lambda: getattr(ro, what)(rollout_id))  # fmt: skip
    return done


def rollout_rollback(
    c: Coordinator, who: Principal, source: str, link: Link, rollout_id: int
) -> Decision:
    """Roll back every device a rollout moved (new signed releases of the previous content)."""
    from .rollouts import Rollouts

    return audited(c, who, "rollout.rollback", f"rollout:{rollout_id}", source,
                   lambda: Rollouts(c, link).rollback(rollout_id),
                   lambda d: {"devices": list(d.devices)})  # fmt: skip


def rollout_start(c: Coordinator, who: Principal, source: str, spec: RolloutSpec) -> int:
    """Record a new rollout (whoever ticks rollouts carries it out); returns its id."""
    from .rollouts import Rollouts

    return audited(c, who, "rollout.start", f"{spec.name}@{spec.version}", source,
                   lambda: Rollouts(c, None).start(spec),
                   lambda rid: {"rollout": rid, "spec": spec.to_dict()})  # fmt: skip
