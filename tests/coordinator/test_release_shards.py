"""Releases and candidates of several signed manifests (``manifest_shard`` devices each): the
registry keeps every shard, each target's offer carries its own, a device's retained offer on
the broker is its shard's, and a bundle file (one manifest) is refused for several shards."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet.coordinator import release as releases
from edgefleet.coordinator.candidates import build_candidate, candidate_facts, candidates
from edgefleet.coordinator.tables.shards import ManifestShard
from edgefleet.infra.link import InMemoryBroker
from edgefleet.infra.link.port import Link
from edgefleet.protocol import topics
from edgefleet.protocol.candidate import CandidateSpec
from edgefleet.protocol.envelope import unwrap_key
from edgefleet.protocol.errors import NotForMeError
from edgefleet.protocol.keyring import Keyring
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ReleaseOffer
from edgefleet.protocol.verify import select_envelope, verify_manifest
from sqlalchemy import select

from .homes import T0, TIMEOUT, Home, make_home

DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d", "dev-e")  # shards of 2: ab | cd | e


@pytest.fixture
def home(tmp_path: Path) -> Home:
    h = make_home(tmp_path, DEVICES)
    h.coordinator.update_config(manifest_shard=2)
    return h


def verified(home: Home, device: str, offer: ReleaseOffer) -> Manifest:
    """What the agent's updater checks, on the offer as the device receives it."""
    keyring = Keyring.decode(offer.keyring)
    m = verify_manifest(keyring, offer.manifest, offer.signature, now=T0, device_id=device,
                        highest_sequence=0)  # fmt: skip
    env = select_envelope(m, [offer.envelope], device)
    assert len(unwrap_key(env, home.kem_private[device], bundle_id=m.bundle_id)) == 32
    return m


def test_each_target_is_offered_its_own_shard(home: Home) -> None:
    r, built = home.coordinator.build("m", "1", "all", now=T0)
    assert len(built.shards) == 3
    assert r.manifest == built.manifest_raw  # the first shard stays in the release row
    stored = home.coordinator.registry.release(sequence=r.sequence)
    assert stored is not None
    for got in (r, stored):  # as built and as read back
        offers = releases.offers(got)
        assert sorted(offers) == list(DEVICES)
        for dev, offer in offers.items():
            m = verified(home, dev, offer)
            assert (offer.manifest, offer.signature) == (
                built.shard_for(dev).raw,
                built.shard_for(dev).signature,
            )
            assert set(m.targets) == set(built.shard_for(dev).manifest.targets)
            assert m.bundle_id == r.bundle_id and m.sequence == r.sequence
        assert {o.manifest for o in offers.values()} == {s.raw for s in built.shards}
    with home.coordinator.registry.session() as s:
        rows = s.scalars(select(ManifestShard).order_by(ManifestShard.shard)).all()
    assert [(x.sequence, x.shard, x.first_target) for x in rows] == [
        (r.sequence, 1, "dev-c"), (r.sequence, 2, "dev-e")]  # fmt: skip


def test_another_shards_manifest_does_not_serve_a_device(home: Home) -> None:
    r, _ = home.coordinator.build("m", "1", "all", now=T0)
    offers = releases.offers(r)
    forged = ReleaseOffer(keyring=offers["dev-a"].keyring, keyring_sig=offers["dev-a"].keyring_sig,
                          manifest=offers["dev-e"].manifest, signature=offers["dev-e"].signature,
                          envelope=offers["dev-a"].envelope)  # fmt: skip
    with pytest.raises(NotForMeError, match="dev-a"):
        verified(home, "dev-a", forged)


def test_a_release_of_one_shard_is_what_it_always_was(home: Home) -> None:
    r, built = home.coordinator.build("m", "1", "dev-b,dev-d", now=T0)
    assert len(built.shards) == 1 and r.shards == []
    offers = releases.offers(r)
    assert {(o.manifest, o.signature) for o in offers.values()} == {(r.manifest, r.signature)}
    assert set(Manifest.decode(r.manifest).targets) == {"dev-b", "dev-d"}


def test_a_bundle_file_is_refused_for_several_shards_in_one_line(
    home: Home, tmp_path: Path
) -> None:
    _, built = home.coordinator.build("m", "1", "all", now=T0)
    with pytest.raises(ValueError, match=r"^release \d+: 5 devices in 3 signed manifests"):
        home.coordinator.write_bundle(built, tmp_path / "all.efb")
    assert not (tmp_path / "all.efb").exists()
    _, one = home.coordinator.build("m", "1", "dev-a,dev-b", now=T0)
    home.coordinator.write_bundle(one, tmp_path / "ab.efb")
    assert (tmp_path / "ab.efb").stat().st_size > len(one.payload)


def test_published_and_superseding_offers_carry_each_devices_shard(
    home: Home, broker: InMemoryBroker, link: Link
) -> None:
    registry = home.coordinator.registry
    older = home.build("1", "all")
    newer = home.build("2", "dev-c,dev-d,dev-e")  # built meanwhile: shards cd | e
    releases.publish(link, newer, timeout=TIMEOUT, registry=registry)
    report = releases.publish(link, older, timeout=TIMEOUT, registry=registry)
    assert report.republished == 3
    for dev in DEVICES:
        offer = ReleaseOffer.decode(broker.retained[topics.release(dev)])
        m = verified(home, dev, offer)
        assert m.sequence == (newer if dev in ("dev-c", "dev-d", "dev-e") else older).sequence
        assert len(m.targets) <= 2


def test_candidates_are_signed_per_shard_too(home: Home) -> None:
    cand = build_candidate(home.coordinator, "m", "2", "all", CandidateSpec(mode="shadow"),
                           now=T0)  # fmt: skip
    [again] = candidates(home.coordinator.registry)
    for c in (cand, again):
        assert c.targets == DEVICES
        manifests = set()
        for dev, offer in c.offers.items():
            m = verified(home, dev, offer)
            assert m.candidate is not None and m.candidate.mode == "shadow"
            assert len(m.targets) <= 2
            manifests.add(offer.manifest)
        assert len(manifests) == 3
    facts = candidate_facts(home.coordinator.registry, cand.bundle_id)  # the chunk server's
    assert facts is not None and facts.targets == frozenset(DEVICES)


def test_bundle_build_signs_one_manifest_for_its_file(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bundle build`` (side-loading) puts every target in the file's one manifest, whatever
    ``manifest_shard`` says: the file is for all of them."""
    from edgefleet.protocol.container import BundleReader

    from edgefleet.cli import main

    out = tmp_path / "all.efb"
    monkeypatch.setattr("time.time", lambda: float(T0))  # the test keyring's clock
    assert main(["bundle", "build", "--home", str(home.coordinator.home), "--name", "m",
                 "--version", "1", "--to", "all", "--out", str(out)]) == 0  # fmt: skip
    data = out.read_bytes()
    reader = BundleReader(lambda off, n: data[off : off + n], file_size=len(data),
                          max_payload=len(data))  # fmt: skip
    m = Manifest.decode(reader.section("manifest"))
    assert sorted(m.targets) == list(DEVICES)
