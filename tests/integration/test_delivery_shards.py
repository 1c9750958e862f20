"""A release to more devices than one signed manifest names, on a real mosquitto: two real
agents (in the first and the last shard) and thin protocol-faithful pullers all verify their
own shard's manifest and install; an agent offered another shard's genuine manifest with its
own envelope refuses it (``not_for_me``) and installs nothing until its own offer comes."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from edgefleet.coordinator.release import offers
from edgefleet.protocol import topics
from edgefleet.protocol.manifest import Manifest
from edgefleet.simulations.homes import ModelFile
from edgefleet.simulations.thin import open_thin_fleet

from tests.conftest import Digits

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        shutil.which("mosquitto") is None, reason="needs the mosquitto binary on PATH"
    ),  # fmt: skip
]
SEGMENT = 4096  # bytes: the ~39 KB digits model in ~10 chunks
AGENTS = ("agent-0", "zeta-1")  # sorted around the thin-* devices: first and last shard
THIN = 7
SHARD = 3  # 9 devices: 3 signed manifests
TIMEOUT = 60.0


def test_every_device_of_a_sharded_release_verifies_and_installs(
    tmp_path: Path, digits_v1: Digits
) -> None:
    models = [ModelFile(name="digits", path=digits_v1.onnx, version="1")]
    with open_thin_fleet(tmp_path, THIN, AGENTS, models=models, segment_size=SEGMENT) as tf:
        fleet = tf.fleet
        fleet.coordinator.update_config(manifest_shard=SHARD)
        devices = sorted([*tf.thin_ids, *AGENTS])
        fleet.start_service()
        agents = {d: fleet.start_agent(d) for d in AGENTS}
        tf.start_pools(1, timeout=1.0)
        release = fleet.build("1")
        offered = offers(release)
        shards = {o.manifest for o in offered.values()}
        assert len(shards) == 3 and sorted(offered) == devices
        for dev, o in offered.items():
            named = Manifest.decode(o.manifest).targets
            assert dev in named and len(named) <= SHARD
        assert offered["zeta-1"].manifest != release.manifest  # not the release row's shard

        # the broker's rogue: agent-0's own envelope under zeta-1's genuine, signed manifest
        attacker = fleet.client("coordinator", "attacker", on_message=lambda *_: None)
        forged = dataclasses.replace(offered["agent-0"], manifest=offered["zeta-1"].manifest,
                                     signature=offered["zeta-1"].signature)  # fmt: skip
        attacker.publish(topics.release("agent-0"), forged.encode(), qos=1)
        result = fleet.wait_result("agent-0", "not_for_me", timeout=TIMEOUT)
        assert result["ok"] is False and "agent-0" in result["reason"], result
        assert agents["agent-0"].agent.active is None

        assert fleet.service is not None
        fleet.service.release(release.sequence)
        assert tf.wait_sequence(release.sequence, TIMEOUT), tf.totals()
        for ra in agents.values():
            assert ra.daemon.installed.wait(TIMEOUT)
        fleet.wait_active(devices, release.sequence, timeout=TIMEOUT)
        totals = tf.totals()
        segments = Manifest.decode(release.manifest).segments
        assert totals["rejected"] == 0 and totals["bad_hash"] == 0, totals
        assert totals["fetched"] == THIN * segments, totals
        for dev, ra in agents.items():  # each agent keeps the manifest of its own shard
            active = ra.agent.active
            assert active is not None and active.manifest_raw == offered[dev].manifest
