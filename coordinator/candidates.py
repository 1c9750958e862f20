"""Candidate releases (shadow / A/B): build, publish, drop, serve their chunks, read their metrics.

A candidate is built like any release (a new sequence from the same counter, the content
encrypted once, the key wrapped per target, the manifest signed by the release key) with the
signed ``candidate`` field (``protocol.candidate.CandidateSpec``: mode ``shadow`` or ``ab`` and
the A/B share). It is recorded in ``candidate_releases`` (``tables/candidates.py``), not in
``releases``, so it never becomes any device's desired release, and it is offered retained on
each target's candidate topic (``ef/v1/dev/<id>/cmd/candidate``: devices already read
``cmd/#``; the active release's retained offer on ``release`` is untouched). The device pulls
its chunks through the ordinary chunk server (``candidate_facts`` is the lookup it falls back
to), installs it into its candidate slot and never activates it.

Dropping is an empty retained message on the candidate topic (the device stops serving the
candidate); promoting is an ordinary ``model release`` (or a rollout) of the same model
version, after which the candidate is dropped.

What a rollout gate reads (telemetry namespaces, summed over a device's windows):
``shadow``: ``agreement = sum(agree) / sum(compared)`` (``agreement>0.95``), and the latency
ratio ``sum(candidate_ms_sum) / sum(active_ms_sum)``; ``ab``: per arm ``errors / count`` and
``p95_ms``. ``shadow_summary`` / ``ab_summary`` do the sums.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgefleet.infra.link.port import Delivery, Link
from edgefleet.protocol import topics
from edgefleet.protocol.candidate import CandidateSpec, candidate_topic
from edgefleet.protocol.canonical import canonical_json
from edgefleet.protocol.envelope import Envelope
from edgefleet.protocol.errors import TransportError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ReleaseOffer
from sqlalchemy import select

from .chunks import ReleaseFacts
from .home import Coordinator
from .registry import Registry
from .tables.candidates import CandidateRow
from .tables.shards import ManifestShard, ShardMap, shard_rows

__all__ = [
    "Candidate",
    "ab_summary",
    "build_candidate",
    "candidate_facts",
    "candidates",
    "clear_candidate",
    "publish_candidate",
    "shadow_summary",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Candidate:
    sequence: int
    bundle_id: str
    name: str
    version: str
    mode: str
    share: float
    targets: tuple[str, ...]
    offers: Mapping[str, ReleaseOffer]


def build_candidate(
    coordinator: Coordinator,
    name: str,
    version: str,
    selector: str,
    spec: CandidateSpec,
    *,
    now: int | None = None,
    ttl: int | None = None,
) -> Candidate:
    """Sign and encrypt a candidate release of a registered model and record it."""
    c = coordinator
    signed = c.sign(name, version, selector, now=now, ttl=ttl, candidate=spec)
    built = signed.built
    row = CandidateRow(
        sequence=built.manifest.sequence,
        bundle_id=built.manifest.bundle_id,
        model_id=signed.model.id,
        selector=selector,
        mode=spec.mode,
        share=spec.share,
        created=signed.created,
        manifest=built.manifest_raw,
        signature=built.signature_raw,
        keyring=c.keys.keyring_raw,
        keyring_sig=c.keys.keyring_sig,
        payload_blob=signed.payload_blob,
        targets={e.device_id: canonical_json(e.to_dict()).decode() for e in built.envelopes},
    )
    shards = shard_rows(row.sequence, built)
    with c.registry.session() as s:
        s.add(row)
        s.add_all(shards)
    log.info("built candidate %d: %s v%s (%s) for %d devices", row.sequence, name, version,
             spec.mode, len(built.envelopes))  # fmt: skip
    return _candidate(row, shards)


def _candidate(row: CandidateRow, shards: Iterable[ManifestShard]) -> Candidate:
    m = Manifest.decode(row.manifest)
    signed = ShardMap.of(row.manifest, row.signature, shards)
    offers = {
        dev: _offer(row, *signed(dev), Envelope.from_dict(json.loads(env)))
        for dev, env in sorted(row.targets.items())
    }
    return Candidate(sequence=row.sequence, bundle_id=row.bundle_id, name=m.name,
                     version=m.model_version, mode=row.mode, share=row.share,
                     targets=tuple(offers), offers=offers)  # fmt: skip


def _offer(row: CandidateRow, manifest: bytes, signature: bytes, env: Envelope) -> ReleaseOffer:
    return ReleaseOffer(keyring=row.keyring, keyring_sig=row.keyring_sig, manifest=manifest,
                        signature=signature, envelope=env)  # fmt: skip


def candidates(registry: Registry) -> list[Candidate]:
    """Every candidate built, oldest first."""
    with registry.session() as s:
        rows = s.scalars(select(CandidateRow).order_by(CandidateRow.sequence)).all()
        shards = s.scalars(select(ManifestShard).where(
            ManifestShard.sequence.in_([r.sequence for r in rows]))).all()  # fmt: skip
    return [_candidate(r, [x for x in shards if x.sequence == r.sequence]) for r in rows]


def candidate_facts(
    registry: Registry, bundle_id: str, *, busy_timeout: float | None = None
) -> ReleaseFacts | None:
    """What the chunk server needs to serve a candidate's chunks (None: not a candidate)."""
    session = (
        registry.session() if busy_timeout is None else registry.session(busy_timeout=busy_timeout)
    )
    with session as s:
        row = s.scalar(select(CandidateRow).where(CandidateRow.bundle_id == bundle_id))
    if row is None:
        return None
    return ReleaseFacts(sequence=row.sequence, targets=frozenset(row.targets),
                        manifest=Manifest.decode(row.manifest),
                        payload_blob=row.payload_blob)  # fmt: skip


def publish_candidate(link: Link, candidate: Candidate, *, timeout: float = 30.0) -> int:
    """Publish every target's candidate offer, retained at QoS 1; return the bytes sent."""
    pending: list[Delivery] = []
    sent = 0
    for dev, offer in candidate.offers.items():
        payload = offer.encode()
        pending.append(link.publish(candidate_topic(topics.cmd(dev)), payload, qos=1, retain=True))
        sent += len(payload)
    _await(pending, f"candidate {candidate.sequence}", timeout)
    log.info("published candidate %d to %d devices", candidate.sequence, len(pending))
    return sent


def clear_candidate(link: Link, device_ids: Iterable[str], *, timeout: float = 30.0) -> int:
    """Drop the candidate on these devices: an empty retained message on their topic."""
    pending = [link.publish(candidate_topic(topics.cmd(d)), b"", qos=1, retain=True)
               for d in sorted(set(device_ids))]  # fmt: skip
    _await(pending, "candidate drop", timeout)
    return len(pending)


def _await(pending: list[Delivery], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for d in pending:
        d.wait(max(0.0, deadline - time.monotonic()))
    unacked = sum(1 for d in pending if not d.published)
    if unacked:
        raise TransportError(f"{what}: {unacked} messages not acknowledged within {timeout:.0f} s")


def shadow_summary(windows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """``shadow`` telemetry windows of one device and candidate, summed: counts, agreement,
    latency ratio and mean confidence delta (None where nothing was compared)."""
    keys = ("samples", "compared", "agree", "dropped", "errors", "skipped")
    sums = ("candidate_ms_sum", "active_ms_sum", "conf_delta_sum", "conf_delta_abs_sum")
    total: dict[str, Any] = dict.fromkeys(keys, 0) | dict.fromkeys(sums, 0.0)
    for w in windows:
        for k in (*keys, *sums):
            value = w.get(k, 0)
            if isinstance(value, int | float) and not isinstance(value, bool):
                total[k] += value
    n, active_ms = total["compared"], total["active_ms_sum"]
    total["agreement"] = total["agree"] / n if n else None
    total["latency_ratio"] = total["candidate_ms_sum"] / active_ms if active_ms else None
    total["conf_delta_mean"] = total["conf_delta_sum"] / n if n else None
    return total


def ab_summary(windows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``ab`` telemetry windows summed per arm: count, rows, errors, error rate, classes."""
    arms: dict[str, dict[str, Any]] = {}
    for w in windows:
        for arm in ("active", "candidate"):
            a = w.get(arm)
            if not isinstance(a, Mapping):
                continue
            t = arms.setdefault(arm, {"count": 0, "rows": 0, "errors": 0, "lat_ms_sum": 0.0,
                                      "classes": {}})  # fmt: skip
            for k in ("count", "rows", "errors", "lat_ms_sum"):
                t[k] += a.get(k, 0) or 0
            for c, n in (a.get("classes") or {}).items():
                t["classes"][c] = t["classes"].get(c, 0) + n
    for t in arms.values():
        t["error_rate"] = t["errors"] / t["count"] if t["count"] else None
    return arms
