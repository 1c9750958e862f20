"""A release as the coordinator sends it to one device: the offer and the chunk replies."""

from __future__ import annotations

from edgefleet.protocol.container import HEADER_SIZE, decode_envelopes, parse_header
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ChunkReply, ReleaseOffer

DEVICE = "dev-a"


class Release:
    """An ``.efb`` split into what the coordinator sends: the offer and the chunk replies."""

    def __init__(self, efb: bytes, device: str = DEVICE) -> None:
        layout = parse_header(efb[:HEADER_SIZE], file_size=len(efb), max_payload=1 << 30)

        def section(name: str) -> bytes:
            off, length = layout[name]
            return efb[off : off + length]

        self.offer = ReleaseOffer(
            keyring=section("keyring"),
            keyring_sig=section("keyring_sig"),
            manifest=section("manifest"),
            signature=section("signature"),
            envelope=next(
                e for e in decode_envelopes(section("envelopes")) if e.device_id == device
            ),
        )
        self.manifest = Manifest.decode(self.offer.manifest)
        self.payload = section("payload")

    def chunk(self, i: int, *, status: str = "ok") -> bytes:
        off, length = self.manifest.segment_span(i)
        return ChunkReply(
            bundle_id=self.manifest.bundle_id,
            index=i,
            corr=f"{i}.1",
            data=self.payload[off : off + length] if status == "ok" else b"",
            status=status,
            reason="" if status == "ok" else "no",
        ).encode()
