"""Offer bytes per device and build time as the fleet grows: manifests signed per shard.

In memory, no broker: a random 8 MB payload (quick: 1 MB) in 256 KiB segments is built with
``protocol.build.build_release`` for 100 / 1,000 / 10,000 devices (quick: 100 / 1,000), each
a real X25519 key, signed by a real release key, offered with the coordinator's real keyring.
Ours: one signed manifest per ``SHARD_TARGETS`` devices (the coordinator's default
``manifest_shard``). Baseline, same run: one manifest naming every target (the release before
sharding; at 10,000 its offer is over the devices' 1 MiB manifest cap, so no device could have
verified it). Offer bytes: the largest ``ReleaseOffer`` any device receives. Build time: the
median of interleaved builds (3; quick: 1), HPKE key wrapping included (the floor of a build:
one wrap per device). Also one manifest per device (``manifest_shard = 1``: no device learns
another's id) at the largest size, and the manifest bytes each layout stores per release.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ._util import Row, interleaved, median

NAME = "offers"
_NOTES: list[str] = []


def notes() -> list[str]:
    return list(_NOTES)


def run(quick: bool) -> list[Row]:
    import numpy as np
    from edgefleet.coordinator.keys import CoordinatorKeys
    from edgefleet.protocol.build import SHARD_TARGETS, BuiltRelease, ReleaseSpec, build_release
    from edgefleet.protocol.keys import generate_kem_key
    from edgefleet.protocol.manifest import MAX_TARGETS, SmokeVector, TensorSpec
    from edgefleet.protocol.messages import ReleaseOffer

    _NOTES.clear()
    sizes = (100, 1_000) if quick else (100, 1_000, 10_000)
    reps = 1 if quick else 3
    model = np.random.default_rng(0).bytes((1 if quick else 8) * 1024 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        keys = CoordinatorKeys.create(Path(tmp), now=1_700_000_000)
    spec = ReleaseSpec(
        name="bench", format="onnx", model_version="1", sequence=1, created=1_700_000_000,
        inputs=(TensorSpec(name="x", dtype="float32", shape=(None, 64)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=(None, 10)),),
        smoke=(SmokeVector(input=((0.5,) * 64,), expected=((0.1,) * 10,)),),
    )  # fmt: skip
    pubs = {f"device-{i:05d}": generate_kem_key().public() for i in range(max(sizes))}

    def offer_bytes(b: BuiltRelease) -> int:
        def one(dev: str) -> int:
            s = b.shard_for(dev)
            return len(ReleaseOffer(keyring=keys.keyring_raw, keyring_sig=keys.keyring_sig,
                                    manifest=s.raw, signature=s.signature,
                                    envelope=b.envelope_for(dev)).encode())  # fmt: skip

        return max(one(s.first_target) for s in b.shards)  # first shard: the fullest

    rows: list[Row] = []
    for n in sizes:
        rec = dict(list(pubs.items())[:n])
        shards = {"sharded": SHARD_TARGETS, "one": MAX_TARGETS}
        if n == max(sizes):
            shards["per-device"] = 1
        built: dict[str, BuiltRelease] = {}
        fns: dict[str, Callable[[], Any]] = {
            k: partial(build_release, model, spec, release_key=keys.release, recipients=rec,
                       shard_size=shard) for k, shard in shards.items()}  # fmt: skip
        after: dict[str, Callable[[Any], None]] = {
            k: partial(built.__setitem__, k) for k in shards}  # fmt: skip
        times = {k: median(v) for k, v in interleaved(fns, reps, after=after).items()}
        ours, base = offer_bytes(built["sharded"]), offer_bytes(built["one"])
        rows.append(
            Row(
                key=f"offer_bytes:{n}",
                metric=f"offer bytes per device, {n:,} devices",
                value=ours,
                unit="B",
                baseline="one manifest naming every target",
                baseline_value=base,
                note=f"{len(built['sharded'].shards)} manifests of {SHARD_TARGETS}",
            )
        )
        rows.append(Row(key=f"build_s:{n}", metric=f"build time, {n:,} devices",
                        value=times["sharded"], unit="s", baseline="one manifest",
                        baseline_value=times["one"]))  # fmt: skip
        stored = {k: sum(len(s.raw) for s in b.shards) for k, b in built.items()}
        _NOTES.append(f"{n:,} devices: manifest bytes stored per release: "
                      + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in stored.items()))  # fmt: skip
        if "per-device" in built:
            pd = built["per-device"]
            rows.append(Row(key=f"build_s_per_device:{n}",
                            metric=f"build time, {n:,} devices, one manifest each",
                            value=times["per-device"], unit="s", baseline="one manifest",
                            baseline_value=times["one"],
                            note=f"offer {offer_bytes(pd):,} B"))  # fmt: skip
    return rows
