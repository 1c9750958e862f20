"""The "one bad device" soak of issue 7 on a hardened mosquitto (``broker-config`` output).

One device runs every attack with its own credentials while releases go to the others. Checked
here: every agent installs, the broker and the coordinator stay up, their memory stays within
the bounds derived from their limits, the service's queues stay within theirs, and every attack
really happened and reached what it attacks (counted by the rogue, the broker and the
coordinator). Release times are reported, never asserted: the attacked ÷ unattacked ratio is
``bench/soak.py``'s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet.coordinator.service import MAX_INCOMING
from edgefleet.infra.broker import CHUNK_FRAME_OVERHEAD, BrokerLimits, dynsec_plugin
from edgefleet.simulations.brokers import hardened
from edgefleet.simulations.fleet import open_fleet
from edgefleet.simulations.homes import ModelFile
from edgefleet.simulations.soak import ROGUE, SoakConfig, SoakReport, run_soak

from tests.conftest import Digits
from tests.integration.brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO

pytestmark = [
    pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO),
    pytest.mark.skipif(dynsec_plugin() is None, reason="needs mosquitto's dynamic-security plugin"),
]


def _summary(r: SoakReport) -> str:
    mb = 1 << 20
    return (f"{r.agents} agents: release {min(r.unattacked):.2f}-{max(r.unattacked):.2f} s "
            f"unattacked, {min(r.attacked):.2f}-{max(r.attacked):.2f} s attacked "
            f"({len(r.attacked)} releases, median ratio {r.ratio:.2f}, worst {r.worst_ratio:.2f}); "
            f"mosquitto +{r.broker.growth // mb} MiB (bound {r.broker.bound // mb}), coordinator "
            f"+{r.coordinator.growth // mb} MiB (bound {r.coordinator.bound // mb}); "
            f"cpu {({k: round(v, 1) for k, v in r.cpu.items()})}; attacks {r.attacks}")


def _check(r: SoakReport, cfg: SoakConfig) -> None:
    print(_summary(r))
    # The fleet got every release; nothing died.
    assert r.installed == cfg.agents and r.attacked
    assert r.broker_alive and r.coordinator_alive
    # Memory: within what the broker's and the service's limits allow.
    assert r.broker.within, f"mosquitto grew {r.broker.growth} > {r.broker.bound} bytes"
    assert r.coordinator.within, f"coordinator grew {r.coordinator.growth} > {r.coordinator.bound}"
    svc, limits = r.service, r.service["limits"]
    assert svc["peak_ingest_bytes"] <= limits["telemetry_bytes"] + limits["status_bytes"]
    assert max(svc["queue_peak"].values()) <= svc["window"]  # segments per device, queued
    assert svc["largest_received"] <= MAX_INCOMING
    assert svc["open_files"] <= limits["max_files"]
    seconds = cfg.attack_seconds + 60  # lookups: one burst, then the rate, per device
    assert svc["lookups"] <= (cfg.agents + 1) * (limits["lookup_burst"]
                                                 + limits["lookup_rate"] * seconds)
    # Every attack happened...
    a = r.attacks
    assert a["amplify_requests"] >= 30 and a["flood_requests"] >= 1000, a
    assert a["retain_own"] > 0 and a["retain_denied"] > 0, a
    assert all(a.get(f"oversize_{i}", 0) > 0 for i in range(5)), a
    assert a["over_limit_sent"] >= 1 and a["connects"] >= 2, a  # closed, and came back
    assert a["share_subscribes"] > 0 and a["share_refused"] == a["connects"], a
    assert a.get("share_granted", 0) == 0, a
    assert a["takeover_attempts"] > 0 and a["takeover_refused"] == a["takeover_attempts"], a
    assert r.rogue_errors == []
    # ... and reached what it attacks, which held.
    # The unread chunk topic: the coordinator sent the rogue more than the broker may queue
    # for it (so the broker dropped it or closed the connection), and the broker held; the
    # repeats of segments it had just been sent were held back (one copy per resend_after).
    queue = (cfg.limits.max_queued_messages + cfg.limits.max_inflight_messages) * (
        cfg.bait_segment + CHUNK_FRAME_OVERHEAD)
    assert svc["sent_bytes"] > queue, (svc["sent_bytes"], queue)
    assert svc["held_back"] > 0
    assert r.others_kicked == 0  # no other client's session was taken over
    drops = {k.split("|", 1)[1]: n for k, n in svc["drops"].items() if k.startswith(f"{ROGUE}|")}
    assert drops.get("lookup budget", 0) > 0  # random bundle ids
    assert drops.get("too large", 0) > 0  # telemetry over the cap
    assert svc["queue_dropped"].get(ROGUE, 0) > 0  # requests beyond its window
    assert all(n == 0 for d, n in svc["queue_dropped"].items() if d != ROGUE)
    assert [k for k in svc["drops"] if not k.startswith(f"{ROGUE}|")] == []  # none of theirs
    assert svc["received"]["up/chunkreq"] >= a["amplify_requests"] + a["flood_requests"] // 2


@pytest.mark.timeout(120)
def test_a_release_installs_on_the_hardened_broker_across_a_restart(
        tmp_path: Path, digits_v1: Digits) -> None:
    models = [ModelFile(name="digits", path=digits_v1.onnx, version=v) for v in ("1", "2")]
    with open_fleet(tmp_path, ["dev-a", "dev-b"], models=models, segment_size=4096,
                    broker=hardened()) as fleet:  # fmt: skip
        assert fleet.broker.kind == "hardened" and fleet.broker.pid is not None
        assert fleet.broker.config_file is not None
        assert "plugin " in fleet.broker.config_file.read_text()  # dynamic security
        fleet.start_service()
        agents = [fleet.start_agent(d) for d in fleet.devices]
        first = fleet.release("1")
        fleet.wait_active(fleet.devices, first.sequence)
        pid = fleet.broker.pid
        fleet.broker.restart()
        assert fleet.broker.pid not in (None, pid)
        for a in agents:
            a.daemon.installed.clear()
        second = fleet.release("2")  # the service's link came back by itself
        for a in agents:
            assert a.daemon.installed.wait(60), a.device_id
        fleet.wait_active(fleet.devices, second.sequence)


@pytest.mark.timeout(180)
def test_one_bad_device_for_ten_seconds_cannot_hurt_five_others(
        tmp_path: Path, digits_v1: Digits) -> None:
    # A shorter queue than the default (so it fills within seconds) of smaller chunks.
    cfg = SoakConfig(agents=5, attack_seconds=10, bait_segment=64 * 1024, releases=3,
                     limits=BrokerLimits(max_queued_messages=200))
    _check(run_soak(tmp_path, digits_v1.onnx, cfg), cfg)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_bad_device_for_sixty_seconds_cannot_hurt_twenty_others(
        tmp_path: Path, digits_v1: Digits) -> None:
    cfg = SoakConfig(agents=20, attack_seconds=60)
    _check(run_soak(tmp_path, digits_v1.onnx, cfg), cfg)
