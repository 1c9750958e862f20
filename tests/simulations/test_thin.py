"""The thin puller: protocol-faithful without the device's own work.

Sans I/O first (an offer and the chunks of a real release, built by the coordinator): it
verifies what an agent verifies and refuses what an agent refuses. Then many of them, each on
its own mosquitto connection, beside a real agent, served by a real ``CoordinatorService``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.daemon import AgentDaemon
from edgefleet.coordinator.release import offers
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ChunkReply, ChunkRequest, DeviceStatus, ReleaseOffer
from edgefleet.simulations.homes import ModelFile, provision_fleet
from edgefleet.simulations.thin import (
    AGENT_HEARTBEAT,
    AGENT_TIMEOUT,
    AGENT_WINDOW,
    ThinPuller,
    enroll_thin,
    open_thin_fleet,
)

from tests.conftest import Digits

pytestmark = [pytest.mark.timeout(180)]
SEGMENT = 4096
NEED_MOSQUITTO = "needs the mosquitto binary on PATH"


def test_defaults_are_the_agents() -> None:
    assert AGENT_WINDOW == AgentConfig.window
    import inspect

    params = inspect.signature(AgentDaemon.__init__).parameters
    assert params["request_timeout"].default == AGENT_TIMEOUT
    assert params["heartbeat"].default == AGENT_HEARTBEAT


def _setup(tmp_path: Path, digits: Digits) -> tuple[ThinPuller, ThinPuller, object, object]:
    homes = provision_fleet(tmp_path, [], models=[ModelFile(name="digits", path=digits.onnx,
                                                            version="1")],
                            segment_size=SEGMENT)  # fmt: skip
    c = homes.coordinator
    ids = enroll_thin(c, ["thin-a", "thin-b", "thin-c"])
    release, built = c.build("digits", "1", "thin-a,thin-b")
    a = ThinPuller(ids["thin-a"], homes.root_public, window=4, timeout=1.0)
    c_dev = ThinPuller(ids["thin-c"], homes.root_public)
    return a, c_dev, release, built


def _serve(puller: ThinPuller, out: list, segments: tuple[bytes, ...], now: float,
           corrupt: int | None = None) -> list:  # fmt: skip
    """Answer every chunk request in ``out``; return what the puller sends next."""
    nxt = []
    for topic, payload, _qos, _retain in out:
        if not topic.endswith("/up/chunkreq"):
            continue
        req = ChunkRequest.decode(payload)
        (i,) = req.indexes
        data = segments[i] if i != corrupt else b"x" * len(segments[i])
        nxt += puller.chunk(ChunkReply(bundle_id=req.bundle_id, index=i, corr=req.corr,
                                       data=data).encode(), now)  # fmt: skip
    return nxt


def test_pulls_verifies_and_reports_like_an_agent(tmp_path: Path, digits_v1: Digits) -> None:
    a, _, release, built = _setup(tmp_path, digits_v1)
    m = Manifest.decode(release.manifest)
    assert m.segments >= 8
    out = a.offer(offers(release)["thin-a"].encode(), now=0.0)
    statuses = [DeviceStatus.decode(p) for t, p, _, _ in out if t.endswith("/up/status")]
    assert [s.state for s in statuses] == ["downloading"]
    assert sum(t.endswith("/up/chunkreq") for t, *_ in out) == 4  # the window
    # one corrupt chunk is refused and asked for again at once
    sent = _serve(a, out, built.segments, 0.1, corrupt=0)
    assert a.stats.bad_hash == 1
    for _ in range(4 * m.segments):
        if not sent or a.pull is None:
            break
        sent = _serve(a, sent, built.segments, 0.2)
    assert a.pull is None and a.highest == m.sequence
    final = [DeviceStatus.decode(p) for t, p, _, _ in sent if t.endswith("/up/status")]
    assert [s.state for s in final] == ["installing", "idle"]
    assert final[-1].active is not None and final[-1].active.sequence == m.sequence
    assert final[-1].last_result is not None and final[-1].last_result.ok
    assert a.stats.fetched == m.segments and a.stats.duplicates == 0
    # the retained offer again: nothing to do; a replayed older-or-equal release: refused
    assert a.offer(offers(release)["thin-a"].encode(), now=1.0) == []


def test_refuses_what_an_agent_refuses(tmp_path: Path, digits_v1: Digits) -> None:
    a, not_target, release, _ = _setup(tmp_path, digits_v1)
    offer = offers(release)["thin-a"]
    # not a target
    out = not_target.offer(offer.encode(), now=0.0)
    assert not_target.stats.rejected == 1 and not_target.pull is None
    assert DeviceStatus.decode(out[0][1]).last_result.code == "not_for_me"
    # someone else's envelope (thin-b's, which thin-a cannot open): refused
    other = offers(release)["thin-b"]
    swapped = dataclasses.replace(offer, envelope=other.envelope)
    a.offer(swapped.encode(), now=0.0)
    assert a.stats.rejected == 1 and a.pull is None
    # a flipped signature byte
    bad = dataclasses.replace(offer, signature=offer.signature[:-2] + b"A=")
    a.offer(bad.encode(), now=0.0)
    assert a.stats.rejected == 2 and a.pull is None
    assert isinstance(ReleaseOffer.decode(offer.encode()), ReleaseOffer)


def test_times_out_and_resends(tmp_path: Path, digits_v1: Digits) -> None:
    a, _, release, _ = _setup(tmp_path, digits_v1)
    out = a.offer(offers(release)["thin-a"].encode(), now=0.0)
    assert a.tick(0.5) == []  # nothing due before the timeout
    assert a.beat(0.5) == [] and len(a.beat(60.0)) == 1  # a status per heartbeat
    again = a.tick(1.0)
    assert len(again) == 4 and a.stats.resent == 4
    assert {ChunkRequest.decode(p).corr for _, p, *_ in again}.isdisjoint(
        {ChunkRequest.decode(p).corr for t, p, *_ in out if t.endswith("chunkreq")})
    # a reply answered twice (same corr) is a duplicate
    req = ChunkRequest.decode(again[0][1])
    reply = ChunkReply(bundle_id=req.bundle_id, index=req.indexes[0], corr=req.corr,
                       status="refused", reason="x").encode()  # fmt: skip
    a.chunk(reply, 1.1)
    a.chunk(reply, 1.1)
    assert a.stats.duplicates == 1 and a.stats.refused == 1


@pytest.mark.slow  # tests/integration/test_scale.py runs thin devices on mosquitto by default
@pytest.mark.skipif(shutil.which("mosquitto") is None, reason=NEED_MOSQUITTO)
def test_thin_devices_and_an_agent_on_mosquitto(tmp_path: Path, digits_v1: Digits) -> None:
    models = [ModelFile(name="digits", path=digits_v1.onnx, version="1")]
    with open_thin_fleet(tmp_path, 30, ["agent-0"], models=models,
                         segment_size=SEGMENT) as tf:  # fmt: skip
        svc = tf.fleet.start_service()
        agent = tf.fleet.start_agent("agent-0")
        tf.start_pools(2, timeout=1.0)
        release = tf.fleet.release("1")
        segments = Manifest.decode(release.manifest).segments
        assert tf.wait_sequence(release.sequence, 60)
        assert agent.daemon.installed.wait(60)
        tf.fleet.wait_active([*tf.thin_ids, "agent-0"], release.sequence, timeout=60)
        totals = tf.totals()
        assert totals["fetched"] == 30 * segments
        assert totals["duplicates"] == 0 and totals["bad_hash"] == 0
        assert totals["rejected"] == 0
        assert svc.chunks.sent_chunks >= 31 * segments
