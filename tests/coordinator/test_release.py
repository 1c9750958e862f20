"""The one release path: build a sequence, make each target's offer, publish them retained."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet.coordinator import release as releases
from edgefleet.protocol.envelope import unwrap_key
from edgefleet.protocol.errors import DecryptError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ReleaseOffer
from edgefleet.protocol.verify import check_envelopes

from .homes import T0, Home, make_home


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path)


def test_build_allocates_a_new_sequence_and_records_the_release(home: Home) -> None:
    first, _ = releases.build(home.coordinator, "m", "1", "dev-a", now=T0)
    second, built = releases.build(home.coordinator, "m", "2", "all", now=T0)
    assert second.sequence == first.sequence + 1
    stored = home.coordinator.registry.release(sequence=second.sequence)
    assert stored is not None and stored.manifest == built.manifest_raw
    assert sorted(t.device_id for t in stored.targets) == ["dev-a", "dev-b", "dev-c"]


def test_offers_carry_the_signed_bytes_and_each_devices_own_envelope(home: Home) -> None:
    r = home.build("1", "dev-a,dev-c")
    got = releases.offers(r)
    assert sorted(got) == ["dev-a", "dev-c"]
    manifest = Manifest.decode(r.manifest)
    keys = set()
    for device, offer in got.items():
        assert ReleaseOffer.decode(offer.encode()) == offer  # what goes on the wire
        assert (offer.manifest, offer.signature) == (r.manifest, r.signature)
        assert (offer.keyring, offer.keyring_sig) == (r.keyring, r.keyring_sig)
        assert offer.envelope.device_id == device
        check_envelopes(manifest, [offer.envelope])
        keys.add(unwrap_key(offer.envelope, home.kem_private[device],
                            bundle_id=manifest.bundle_id))
    assert keys == {r.content_key}  # one content key, wrapped per device


def test_a_device_cannot_open_another_devices_envelope(home: Home) -> None:
    r = home.build("1", "dev-a,dev-b")
    offer = releases.offers(r)["dev-a"]
    with pytest.raises(DecryptError, match="HPKE open failed"):
        unwrap_key(offer.envelope, home.kem_private["dev-b"],
                   bundle_id=Manifest.decode(r.manifest).bundle_id)


def test_publish_sequence_of_an_unknown_release(home: Home) -> None:
    with pytest.raises(LookupError, match="release 99 does not exist"):
        releases.publish_sequence(home.coordinator.registry, None, 99)  # type: ignore[arg-type]
