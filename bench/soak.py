"""One bad device (issue 7): releases to 20 agents while a rogue device attacks for 60 s.

``simulations.soak.run_soak`` on a hardened mosquitto (``broker-config`` output: dynamic
security, ``BrokerLimits``): the coordinator service and the rogue run in processes of their
own, the 20 agents (quick: 3) as threads of this one, all on the same cores. The rogue uses
its own valid credentials for every attack of ``simulations.attacks``: 16-segment requests for
a release of 16 × 256 KiB segments that targets it on a chunk topic it never reads, the
coordinators' ``$share`` group, 1,500 random-id chunk requests/s, client-id takeovers,
telemetry up to the broker's packet limit, retained spam (quick: 10 s, 64 KiB segments).

Timed: from publishing a release (built beforehand) until every agent has installed and
activated it (the digits ONNX model, 4 KiB segments: ~10 chunks). Baseline: the same release,
unattacked, in the same run (the median of 5 after a warm-up); under attack, as many releases
as fit into the attack. Memory: the growth of ``VmRSS`` (peak during the attack minus just
before it) of mosquitto and of the coordinator process, against the bound derived from their
limits. MB = 10^6 bytes.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from ._util import Row, fleet

NAME = "soak"
_NOTES: list[str] = []
MB = 1e6


def notes() -> list[str]:
    return list(_NOTES)


def run(quick: bool) -> list[Row]:
    from edgefleet.infra.broker import _which
    from edgefleet.simulations.soak import SoakConfig, run_soak

    if _which("mosquitto") is None:  # the soak is about the broker operators deploy
        _NOTES[:] = ["skipped: needs the mosquitto binary (the hardened broker-config set-up)"]
        return []

    cfg = (SoakConfig(agents=3, attack_seconds=8, bait_segment=64 * 1024, releases=3)
           if quick else SoakConfig(agents=20, attack_seconds=60))  # fmt: skip
    model = fleet().artifacts.onnx_path
    with tempfile.TemporaryDirectory(prefix="edgefleet-soak-") as work:
        r = run_soak(Path(work), model, cfg)
    unattacked = statistics.median(r.unattacked)
    n = f"{r.agents} agents"
    _NOTES[:] = [
        f"unattacked releases (s): {' '.join(f'{t:.2f}' for t in r.unattacked)}",
        f"attacked releases (s, {len(r.attacked)}): "
        + " ".join(f"{t:.2f}" for t in r.attacked),
        "CPU seconds during the attack: "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r.cpu.items())),
        f"rogue: {dict(sorted(r.attacks.items()))}",
        f"coordinator drops: {r.service['drops']}, window drops {r.service['queue_dropped']}",
        f"coordinator sent {r.service['sent_bytes'] / MB:.0f} MB of chunks, "
        f"{r.service['lookups']} registry lookups; broker log: others kicked {r.others_kicked},"
        f" dropped for the rogue {r.broker_dropped_for_rogue}",
        f"mosquitto RSS {r.broker.before / MB:.1f} -> peak {r.broker.peak / MB:.1f} -> "
        f"{r.broker.after / MB:.1f} MB; coordinator {r.coordinator.before / MB:.1f} -> peak "
        f"{r.coordinator.peak / MB:.1f} -> {r.coordinator.after / MB:.1f} MB",
    ]
    up = r.broker_alive and r.coordinator_alive and r.installed == r.agents
    return [
        Row(key="release_s:attacked", metric=f"release to {n} under attack (median)",
            value=statistics.median(r.attacked), unit="s", baseline="unattacked (median)",
            baseline_value=unattacked, aim="<= 2.0"),
        Row(key="release_s:attacked_worst", metric=f"release to {n} under attack (slowest)",
            value=max(r.attacked), unit="s", baseline="unattacked (median)",
            baseline_value=unattacked, aim="<= 2.0"),
        Row(key="rss_growth_mb:broker", metric="mosquitto RSS growth during the attack",
            value=r.broker.growth / MB, unit="MB", baseline="bound from its config",
            baseline_value=r.broker.bound / MB, aim="<= 1.0"),
        Row(key="rss_growth_mb:coordinator", metric="coordinator RSS growth during the attack",
            value=r.coordinator.growth / MB, unit="MB", baseline="bound from its limits",
            baseline_value=r.coordinator.bound / MB, aim="<= 1.0"),
        Row(key="up", metric="broker and coordinator up, every agent on the last release",
            value=1.0 if up else 0.0, unit="flag", aim="== 1"),
        Row(key="takeovers", metric="other clients' sessions taken over by the rogue",
            value=float(r.others_kicked + r.attacks.get("takeover_accepted", 0)),
            unit="count", aim="== 0"),
    ]  # fmt: skip
