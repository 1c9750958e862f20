"""Hostile clients against a running fleet.

Two threat models:

- a rogue holding a *device's* broker credentials (dev-a): mosquitto's ACL must refuse
  everything outside dev-a's own ``up/`` topics, and the coordinator must shrug off whatever
  dev-a may legitimately send (garbage, oversize, requests for releases it is not a target of);
- a compromised broker (the attacker writes with the *coordinator's* credentials): every
  forged, replayed, misdirected, malformed or oversize release and every forged chunk is
  rejected by the agent itself, reported in its retained status (so it shows in the
  coordinator's registry), and a genuine release afterwards still installs.

"Never arrives" is shown with sentinels: a publisher's later, allowed message reaches a
subscriber after its earlier ones would have, so once the sentinel is in, the rest is final.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from edgefleet.infra.link.mqtt import MqttConfig, MqttLink
from edgefleet.protocol.canonical import canonical_json
from edgefleet.protocol.keyring import Signature
from edgefleet.protocol.keys import SigningKey
from edgefleet.protocol.manifest import MAX_MANIFEST, Manifest
from edgefleet.protocol.messages import (
    MAX_OFFER,
    ActiveModel,
    ChunkReply,
    ChunkRequest,
    DeviceStatus,
    ReleaseOffer,
)
from edgefleet.simulations.homes import provision_fleet

from edgefleet.cli import main
from tests.conftest import Digits

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO
from .fleet import (
    BROKERS,
    TIMEOUT,
    FleetHarness,
    RunningAgent,
    cli_mosquitto,
    digits_test_split,
    open_fleet,
    wait_until,
)

pytestmark = [pytest.mark.timeout(120)]
needs_mosquitto = pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR
           and r.name.split(".")[0] in ("agent", "coordinator", "edgefleet")]
    assert not bad, [r.getMessage() for r in bad]


def _unchanged(a: RunningAgent, sequence: int, x: np.ndarray, baseline: np.ndarray) -> None:
    assert a.daemon.alive, f"{a.device_id}: daemon thread died"
    assert a.active_sequence() == sequence
    np.testing.assert_array_equal(a.agent.predict(x), baseline)


def _start(fleet: FleetHarness, devices: list[str]) -> tuple[dict[str, RunningAgent], int]:
    fleet.start_service()
    agents = {d: fleet.start_agent(d) for d in devices}
    release = fleet.release("1", "all")
    for a in agents.values():
        assert a.daemon.installed.wait(TIMEOUT), a.device_id
    fleet.wait_active(devices, release.sequence)
    return agents, release.sequence


# -- a rogue with device credentials ----------------------------------------------------------


@BROKERS
def test_rogue_device_is_confined_by_the_acl_and_cannot_hurt_the_fleet(
        tmp_path: Path, digits_v1: Digits, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    caplog.set_level(logging.WARNING)
    x, _ = digits_test_split(digits_v1)
    with open_fleet(tmp_path, digits_v1, ["dev-a", "dev-b"], kind=kind) as fleet:
        agents, seq = _start(fleet, ["dev-a", "dev-b"])
        baseline = {d: a.agent.predict(x) for d, a in agents.items()}
        current = fleet.coordinator.registry.release(sequence=seq)
        assert current is not None
        only_b = fleet.build("1", "dev-b")  # dev-a is not a target of this one
        svc = fleet.service
        assert svc is not None
        _, watch = fleet.client("coordinator", "watch", ["ef/v1/#"])
        rogue, seen = fleet.client("dev-a", "rogue-a", [
            "ef/v1/dev/dev-b/release", "ef/v1/dev/dev-b/chunk", "ef/v1/dev/dev-b/cmd",
            "ef/v1/dev/+/release", "ef/v1/dev/+/chunk", "ef/v1/dev/#"])

        # Refused by the ACL: nothing outside ef/v1/dev/dev-a/up/ gets through.
        offer_b = fleet.offer(only_b, "dev-b")
        forged = ReleaseOffer(keyring=offer_b.keyring, keyring_sig=offer_b.keyring_sig,
                              manifest=offer_b.manifest, envelope=offer_b.envelope,
                              signature=Signature(keyid="0" * 64,
                                                  sig=bytes(64)).encode())
        status_b = DeviceStatus(device_id="dev-b", time=0, state="idle",
                                active=ActiveModel(name="digits", version="666", sequence=666,
                                                   format="onnx", bundle_id="0" * 32))
        refused = {
            "ef/v1/dev/dev-a/release": forged.encode(),
            "ef/v1/dev/dev-b/release": offer_b.encode(),  # even a genuine one
            "ef/v1/dev/dev-a/chunk": ChunkReply(bundle_id=current.bundle_id, index=0, corr="x",
                                                data=b"ROGUE" * 100).encode(),
            "ef/v1/dev/dev-b/chunk": b"ROGUE chunk",
            "ef/v1/dev/dev-b/cmd": b"ROGUE cmd",
            "ef/v1/dev/dev-b/up/status": status_b.encode(),
            "ef/v1/dev/dev-b/up/chunkreq": ChunkRequest(
                bundle_id=only_b.bundle_id, indexes=(0,), reply_to="ef/v1/dev/dev-b/chunk",
                corr="rogue").encode(),
            "ef/v1/coordinator/anything": b"ROGUE elsewhere",
        }
        for topic, payload in refused.items():
            rogue.publish(topic, payload, qos=1, retain=topic.endswith("/release"))
        sentinel = b'{"sentinel": 1}'
        rogue.publish("ef/v1/dev/dev-a/up/telemetry", sentinel, qos=1)
        assert watch.wait_for(lambda ms: any(m.payload == sentinel for m in ms), TIMEOUT)
        got = {(m.topic, m.payload) for m in watch.messages}
        assert not got & set(refused.items()), "the ACL let a forbidden publish through"
        assert not [t for t in seen.topics() if "/dev-b/" in t], "dev-a read dev-b's topics"

        # Allowed but hostile: dev-a's own up/ topics. The coordinator drops or refuses.
        up = "ef/v1/dev/dev-a/up/"
        allowed = [
            (up + "chunkreq", b"\xff garbage {"),
            (up + "chunkreq", b"{" + b" " * 100_000 + b"}"),  # oversize
            (up + "chunkreq", ChunkRequest(bundle_id=current.bundle_id, indexes=(0,),
                                           reply_to="ef/v1/dev/dev-b/chunk",
                                           corr="misdirect").encode()),
            (up + "status", b"garbage"),
            (up + "status", b"{" + b" " * 100_000 + b"}"),  # oversize
            (up + "status", DeviceStatus(device_id="dev-b", time=0, state="error").encode()),
            (up + "telemetry", b"[1, 2"),
            (up + "telemetry", b"x" * 200_000),
            (up + "chunkreq", ChunkRequest(bundle_id=only_b.bundle_id, indexes=(0, 1),
                                           reply_to="ef/v1/dev/dev-a/chunk",
                                           corr="not-a-target").encode()),
            (up + "chunkreq", ChunkRequest(bundle_id=current.bundle_id, indexes=(10_000,),
                                           reply_to="ef/v1/dev/dev-a/chunk",
                                           corr="out-of-range").encode()),
        ]
        for topic, payload in allowed:
            rogue.publish(topic, payload, qos=1)

        def replies(ms: list) -> dict[str, ChunkReply]:  # type: ignore[type-arg]
            out = {}
            for m in list(ms):
                if m.topic == "ef/v1/dev/dev-a/chunk":
                    r = ChunkReply.decode(m.payload, max_data=1 << 20)
                    out[r.corr] = r
            return out

        # Chunk requests are served in order: once the last one is answered, all were seen.
        assert watch.wait_for(lambda ms: "out-of-range" in replies(ms), TIMEOUT)
        answered = replies(watch.messages)
        assert answered["not-a-target"].status == "refused"
        assert answered["out-of-range"].status == "refused"
        assert "misdirect" not in answered
        assert not [m for m in watch.messages if m.topic == "ef/v1/dev/dev-b/chunk"]
        assert svc.chunks.refused == 2  # one request not for dev-a, one index out of range
        assert seen.wait_for(lambda ms: replies(ms).keys() >= {"not-a-target", "out-of-range"},
                             TIMEOUT), "the refusals go to dev-a's own chunk topic"

        dev_b = fleet.device("dev-b")
        assert (dev_b.state, dev_b.active_sequence) == ("idle", seq)  # impersonation ignored
        for d, a in agents.items():
            _unchanged(a, seq, x, baseline[d])

        # The fleet still works: a genuine release installs everywhere.
        for a in agents.values():
            a.daemon.installed.clear()
        nxt = fleet.release("2", "all")
        for a in agents.values():
            assert a.daemon.installed.wait(TIMEOUT), a.device_id
        fleet.wait_active(["dev-a", "dev-b"], nxt.sequence)
        _no_errors_logged(caplog)


# -- a compromised broker ----------------------------------------------------------------------


@BROKERS
def test_agent_rejects_what_a_compromised_broker_injects(
        tmp_path: Path, digits_v1: Digits, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    caplog.set_level(logging.WARNING)
    x, _ = digits_test_split(digits_v1)
    with open_fleet(tmp_path, digits_v1, ["dev-a", "dev-b"], kind=kind) as fleet:
        agents, first = _start(fleet, ["dev-a", "dev-b"])
        a = agents["dev-a"]
        old = fleet.coordinator.registry.release(sequence=first)
        assert old is not None
        current = fleet.release("2", "all")  # TFLite: a different model file than `old`
        fleet.wait_active(["dev-a", "dev-b"], current.sequence)
        only_b = fleet.build("1", "dev-b")
        fleet.service.release(only_b.sequence)  # type: ignore[union-attr]
        fleet.wait_active(["dev-b"], only_b.sequence)
        upcoming = fleet.build("1", "all")  # genuine; published only at the very end
        seq = current.sequence
        baseline = a.agent.predict(x)

        attacker, _ = fleet.client("coordinator", "attacker", (),
                                   default_max_packet=8 * 1024 * 1024)
        topic = "ef/v1/dev/dev-a/release"
        good = fleet.offer(upcoming, "dev-a")
        stranger = SigningKey.generate()
        real_keyid = Signature.decode(good.signature).keyid

        def resign(key: SigningKey, keyid: str) -> bytes:
            return ReleaseOffer(keyring=good.keyring, keyring_sig=good.keyring_sig,
                                manifest=good.manifest, envelope=good.envelope,
                                signature=Signature(keyid=keyid,
                                                    sig=key.sign(good.manifest)).encode()).encode()

        huge_manifest = canonical_json({  # under MAX_OFFER, but the manifest field is too big
            "type": "release", "schema_version": 1, "keyring": "", "keyring_sig": "",
            "manifest": "A" * (MAX_MANIFEST * 4 // 3 + 8), "signature": "", "envelope": {}})
        assert len(huge_manifest) < MAX_OFFER
        attacks = [  # (payload, the code dev-a reports, its reason); consecutive codes differ
            (fleet.offer(old, "dev-a").encode(), "rollback", "sequence"),  # a replay
            (b'{"type": "release", garbage', "decode", "invalid JSON"),
            (fleet.offer(only_b, "dev-b").encode(), "not_for_me", "dev-a"),  # another device's
            (huge_manifest, "decode", "at most"),
            (resign(stranger, real_keyid), "signature", ""),  # the release key's id, wrong key
            (resign(stranger, stranger.keyid), "untrusted_signer", stranger.keyid[:8]),
        ]
        for payload, code, reason in attacks:
            attacker.publish(topic, payload, qos=1)
            result = fleet.wait_result("dev-a", code)
            assert result["ok"] is False and reason in result["reason"], result
            _unchanged(a, seq, x, baseline)
        rows = {r["device"]: r for r in fleet.fleet_status()}
        assert rows["dev-a"]["last_result"].startswith("untrusted_signer:")
        assert rows["dev-a"]["sequence"] == seq

        # Oversize: dropped unread before any parsing (counted, reported in telemetry).
        handled = a.daemon.handled["release"]
        attacker.publish(topic, b"{" + b" " * MAX_OFFER + b"}", qos=1)
        wait_until(lambda: a.daemon.dropped == 1, "the oversize offer to be dropped")
        assert a.daemon.handled["release"] == handled
        _unchanged(a, seq, x, baseline)

        # Forged chunks during a real download: right bundle id and index, wrong bytes.
        forged_replies = 3
        manifest = Manifest.decode(upcoming.manifest)
        answered = []
        lock = threading.Lock()

        def forge(topic_: str, payload: bytes, _props: object) -> None:
            req = ChunkRequest.decode(payload)
            with lock:
                if len(answered) >= forged_replies or req.bundle_id != manifest.bundle_id:
                    return
                answered.extend(req.indexes)
            for i in req.indexes:
                length = manifest.segment_span(i)[1]
                forger.publish("ef/v1/dev/dev-a/chunk", ChunkReply(
                    bundle_id=req.bundle_id, index=i, corr=req.corr,
                    data=b"\0" * length).encode(), qos=1)

        forger = fleet.broker.link_factory(
            MqttConfig(url=fleet.broker.url, client_id="forger", username="coordinator",
                       password=fleet.users["coordinator"], protocol=fleet.protocol), forge)
        forger.subscribe("ef/v1/dev/dev-a/up/chunkreq")
        fleet.links.append(forger)
        forger.start()
        assert forger.wait_connected(TIMEOUT)
        fleet.gate.close(["dev-a"])  # the real coordinator stays silent towards dev-a for now
        fleet.service.release(upcoming.sequence)  # type: ignore[union-attr]
        fleet.wait_active(["dev-b"], upcoming.sequence)  # dev-b is served as usual
        fleet.wait_registry(["dev-a"], lambda d: ((d.last_result or {}).get("progress") or {})
                            .get("rejected") == forged_replies, "dev-a to report forged chunks")
        _unchanged(a, seq, x, baseline)

        a.daemon.installed.clear()
        fleet.gate.open()  # dev-a re-requests what timed out and gets the genuine chunks
        assert a.daemon.installed.wait(TIMEOUT)
        fleet.wait_active(["dev-a"], upcoming.sequence)
        assert fleet.wait_result("dev-a", "ok")["sequence"] == upcoming.sequence
        np.testing.assert_allclose(a.agent.predict(x), digits_v1.proba(x), atol=1e-5, rtol=0)
        assert a.checkpoints.activations == 3  # first, current, upcoming: nothing else
        assert all(ra.daemon.alive for ra in agents.values())
        _no_errors_logged(caplog)


# -- the generated mosquitto configuration -------------------------------------------------------


@needs_mosquitto
def test_broker_config_cli_setup_enforces_the_acl_and_delivers(
        tmp_path: Path, digits_v1: Digits) -> None:
    devices = ["dev-a", "dev-b"]
    with open_fleet(tmp_path, digits_v1, devices,
                    broker=lambda c: cli_mosquitto(c, tmp_path / "broker-conf")) as fleet:
        conf = (tmp_path / "broker-conf" / "mosquitto.conf").read_text()
        assert "allow_anonymous false" in conf and "plugin_opt_config_file" in conf

        # No anonymous access, no wrong passwords.
        for user, password in (("dev-a", "wrong-password"), ("nobody", "x")):
            link = MqttLink(MqttConfig(url=fleet.broker.url, client_id=f"bad-{user}",
                                       username=user, password=password), lambda *_: None)
            link.start()
            try:
                wait_until(lambda: link.last_error, f"{user} to be refused")  # noqa: B023
                assert not link.connected.is_set()
            finally:
                link.stop()

        coord, watch = fleet.client("coordinator", "watch", ["ef/v1/#"])
        # A device account connects only as agent-<id> (issue 7 item 4); its wildcard and
        # foreign subscriptions are refused (SUBACK failure), so only its own cmd arrives.
        spy, spied = fleet.client("dev-a", "agent-dev-a", [
            "ef/v1/dev/dev-b/release", "ef/v1/dev/dev-b/chunk", "ef/v1/dev/dev-b/cmd",
            "ef/v1/dev/dev-b/#", "ef/v1/#", "#", "ef/v1/dev/dev-a/cmd"])
        listener, dev_b = fleet.client("dev-b", "agent-dev-b", ["ef/v1/dev/dev-b/release",
                                                                "ef/v1/dev/dev-b/chunk",
                                                                "ef/v1/dev/dev-b/cmd"])
        for kind in ("release", "chunk", "cmd"):
            coord.publish(f"ef/v1/dev/dev-b/{kind}", f"for b: {kind}".encode(), qos=1,
                          retain=kind == "release")
        coord.publish("ef/v1/dev/dev-a/cmd", b"sentinel", qos=1)
        spied.wait_topic("ef/v1/dev/dev-a/cmd")
        assert dev_b.wait_for(lambda ms: len(ms) >= 3, TIMEOUT)
        assert set(spied.topics()) == {"ef/v1/dev/dev-a/cmd"}  # nothing of dev-b's

        spy.publish("ef/v1/dev/dev-a/release", b"forged", qos=1, retain=True)
        spy.publish("ef/v1/dev/dev-b/release", b"forged", qos=1, retain=True)
        spy.publish("ef/v1/dev/dev-a/up/status", b"sentinel-up", qos=1)
        assert watch.wait_for(lambda ms: any(m.payload == b"sentinel-up" for m in ms), TIMEOUT)
        assert not [m for m in watch.messages if m.payload == b"forged"]
        spy.stop()  # the agents take these client ids now
        listener.stop()

        # The same broker carries a real release end to end.
        fleet.start_service()
        agents = [fleet.start_agent(d) for d in devices]
        release = fleet.release("1", "all")
        for a in agents:
            assert a.daemon.installed.wait(TIMEOUT), a.device_id
        fleet.wait_active(devices, release.sequence)


@needs_mosquitto
def test_broker_config_cli_default_location(tmp_path: Path) -> None:
    c = provision_fleet(tmp_path, ["dev-a"]).coordinator
    assert main(["coordinator", "broker-config", "--home", str(c.home), "--port", "1884"]) == 0
    out = c.home / "broker"
    assert {p.name for p in out.iterdir()} >= {"mosquitto.conf", "dynamic-security.json"}
    assert (out / "dynamic-security.json").stat().st_mode & 0o077 == 0
    password = (c.home / "secrets" / "devices" / "dev-a.password").read_text().strip()
    assert password and password not in (out / "dynamic-security.json").read_text()  # hashed
    assert "listener 1884 127.0.0.1" in (out / "mosquitto.conf").read_text()
