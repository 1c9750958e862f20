"""``edgefleet bundle inspect``: print what a bundle file says about itself (no secrets)."""

from __future__ import annotations

import argparse
import json
import os
import time

from edgefleet.protocol.container import BundleReader, decode_envelopes
from edgefleet.protocol.keyring import Keyring, Signature
from edgefleet.protocol.manifest import Manifest


def inspect(args: argparse.Namespace) -> int:
    with open(args.file, "rb") as f:
        bundle = BundleReader(
            lambda off, n: os.pread(f.fileno(), n, off),
            file_size=os.fstat(f.fileno()).st_size,
            max_payload=1 << 40,
        )
        raw = {
            n: bundle.section(n)
            for n in ("keyring", "keyring_sig", "manifest", "signature", "envelopes")
        }
    size = bundle.layout.total
    verified = "not verified (pass --trust root.pub)"
    if args.trust:
        from edgefleet.protocol.keys import decode_public_key
        from edgefleet.protocol.verify import verify_keyring

        now = int(time.time())
        keyring = verify_keyring(
            decode_public_key(args.trust.read_bytes()),
            raw["keyring"],
            raw["keyring_sig"],
            now=now,
            current=None,
        )
        sig = Signature.decode(raw["signature"])
        from edgefleet.protocol.keys import verify_signature

        verify_signature(
            keyring.release_key(sig.keyid, now).public, sig.sig, raw["manifest"], what="manifest"
        )
        verified = "verified against the given root key"
    manifest = Manifest.decode(raw["manifest"])
    envelopes = decode_envelopes(raw["envelopes"])
    doc = manifest.to_dict()
    doc["segment_hashes"] = f"{len(manifest.segment_hashes)} hashes"
    doc["smoke"] = f"{len(manifest.smoke)} vectors"
    out = {
        "file": str(args.file),
        "size": size,
        "signature": verified,
        "signed_by": Signature.decode(raw["signature"]).keyid,
        "keyring_version": Keyring.decode(raw["keyring"]).version,
        "envelopes": [
            {"device_id": e.device_id, "kem": e.kem, "bytes": len(e.sealed)} for e in envelopes
        ],
        "manifest": doc,
    }
    print(json.dumps(out, indent=2))
    return 0
