"""A fuzz run of every decoder that reads network or file input. Deterministic, pure.

Each target is one decoder, the errors that mean "refused" (our own: ``EdgeFleetError`` for
the protocol, a 4xx ``HttpError`` for the local HTTP API) and valid encodings to start from,
built here from fixed keys and bytes (no randomness: a seed number gives the same inputs on
every machine). ``run(n, seed)`` feeds each target ``n`` generated inputs: the valid
encodings mutated (bit flips, byte sets, truncation, deletion, insertion, splices of another
target's encoding, tokens such as ``NaN``, ``1e400``, lone surrogates, overlong UTF-8 and deep
nesting), their JSON parts rewritten (type swaps, huge numbers, duplicate keys, unknown or
missing keys, long and odd unicode strings), framed parts re-framed with consistent or wrong
lengths, and plain random bytes. Anything else a decoder raises (``KeyError``,
``TypeError``, ``RecursionError``, ``OverflowError``, ``MemoryError``, ...) is a ``Crash``;
so is a decoded value that cannot be encoded again.

``bench/fuzz.py`` runs >= 100,000 inputs; ``tests/test_fuzz.py`` a fixed-seed sample.
"""

from __future__ import annotations

import json
import random
import struct
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edgefleet.agent.http import HttpError, content_length, parse_inputs
from edgefleet.protocol import fl
from edgefleet.protocol.canonical import canonical_json
from edgefleet.protocol.container import (
    BundleReader,
    decode_envelopes,
    encode_envelopes,
    encode_header,
)
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.envelope import Envelope
from edgefleet.protocol.errors import EdgeFleetError
from edgefleet.protocol.keyring import KeyEntry, Keyring, Signature
from edgefleet.protocol.keys import (
    KEM_HYBRID,
    KEM_X25519,
    KemPublicKey,
    SigningKey,
    decode_public_key,
    encode_public_key,
)
from edgefleet.protocol.manifest import Manifest, SmokeVector, TensorSpec
from edgefleet.protocol.messages import (
    ActiveModel,
    ChunkReply,
    ChunkRequest,
    DeviceStatus,
    DownloadProgress,
    InstallResult,
    ReleaseOffer,
    Telemetry,
)
from edgefleet.protocol.segments import ciphertext_size, segment_count, sha256_hex

from ._fuzzcases import Inner, generate

__all__ = ["Crash", "Report", "Target", "run", "targets"]

MAX_CHUNK_DATA = 256 * 1024 + 16  # what the agent passes as max_data for a 256 KiB segment
MAX_BUNDLE_PAYLOAD = 64 * 1024 * 1024
HTTP_SPEC = TensorSpec(name="x", dtype="float32", shape=(None, 64))


@dataclass(frozen=True, kw_only=True)
class Target:
    """One decoder under fuzz. ``inner`` (framed formats): the JSON parts of an encoding and a
    function that frames replacements of them again with consistent lengths."""

    name: str
    decode: Callable[[bytes], object]
    refused: Callable[[Exception], bool]
    seeds: tuple[bytes, ...]
    inner: Inner | None = None


@dataclass(frozen=True, kw_only=True)
class Crash:
    target: str
    error: str  # "KeyError: 'x'", cut to one line
    where: str  # file:line of the innermost frame
    input: bytes


@dataclass(frozen=True, kw_only=True)
class Report:
    inputs: dict[str, int] = field(default_factory=dict)  # per target
    accepted: dict[str, int] = field(default_factory=dict)
    crashes: tuple[Crash, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.inputs.values())


# -- the property ------------------------------------------------------------------------
def _ours(exc: Exception) -> bool:
    return isinstance(exc, EdgeFleetError)


def _http_4xx(exc: Exception) -> bool:
    return isinstance(exc, HttpError) and 400 <= exc.status < 500


def _reencode(value: object) -> None:
    """A decoded value must encode again (a coordinator stores and forwards them)."""
    items = value if isinstance(value, list | tuple) else [value]
    for item in items:
        for attr in ("encode", "to_dict"):
            method = getattr(item, attr, None)
            if callable(method):
                out = method()
                if attr == "to_dict":
                    canonical_json(out)
                break


def check(target: Target, data: bytes) -> Crash | bool:
    """True if ``data`` decoded, False if refused with one of our errors, else the Crash."""
    try:
        _reencode(target.decode(data))
        return True
    except Exception as exc:
        if target.refused(exc):
            return False
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        line = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return Crash(
            target=target.name, error=line, where=f"{frame.filename}:{frame.lineno}", input=data
        )


# -- valid encodings, from fixed keys ---------------------------------------------------------
def _key(n: int) -> SigningKey:
    return SigningKey.from_raw(bytes([n]) * 32)


def _fixed(n: int, tag: int) -> bytes:
    return random.Random(tag).randbytes(n)


def _manifest(sequence: int, segment: int, size: int) -> Manifest:
    n = segment_count(size, segment)
    return Manifest(
        bundle_id=_fixed(16, sequence).hex(),
        name="digits",
        format="onnx",
        sequence=sequence,
        model_version=f"{sequence}.0",
        created=1_700_000_000,
        expires=1_700_000_000 + 86_400,
        targets={"dev-a": sha256_hex(b"a"), "dev-b": sha256_hex(b"b")},
        inputs=(TensorSpec(name="x", dtype="float32", shape=(None, 64)),),
        outputs=(TensorSpec(name="probabilities", dtype="float32", shape=(None, 10)),),
        plaintext_size=size,
        plaintext_sha256=sha256_hex(b"model"),
        segment_size=segment,
        payload_size=ciphertext_size(size, segment),
        segment_hashes=tuple(sha256_hex(bytes([i])) for i in range(n)),
        smoke=(SmokeVector(input=((0.0,) * 4,), expected=((1.0, 0.0),), atol=1e-4),),
        reference_stats={"mean": [0.5, 1.5], "n": 10},
        lineage={"parent": None, "round": 3, "contributors": ["dev-a"], "metrics": {"acc": 0.9}},
    )


@dataclass(frozen=True)
class _Corpus:
    keyring: bytes
    keyring_sig: bytes
    manifests: tuple[bytes, ...]
    signatures: tuple[bytes, ...]
    envelopes: tuple[Envelope, ...]


def _corpus() -> _Corpus:
    root, release = _key(1), _key(2)
    keyring = Keyring(
        version=2,
        expires=1_800_000_000,
        root_keyid=root.keyid,
        keys=(
            KeyEntry(keyid=release.keyid, public=release.public_raw, expires=1_800_000_000),
            KeyEntry(keyid=_key(3).keyid, public=_key(3).public_raw, expires=1_750_000_000),
        ),
    ).encode()
    manifests = tuple(
        _manifest(s, seg, size).encode()
        for s, seg, size in ((1, 1024, 3000), (7, 4096, 4096), (9, 1024, 1))
    )
    return _Corpus(
        keyring=keyring,
        keyring_sig=Signature(keyid=root.keyid, sig=root.sign(keyring)).encode(),
        manifests=manifests,
        signatures=tuple(
            Signature(keyid=release.keyid, sig=release.sign(m)).encode() for m in manifests
        ),
        envelopes=(
            Envelope(device_id="dev-a", kem=KEM_X25519, sealed=_fixed(80, 1)),
            Envelope(device_id="dev-b", kem=KEM_HYBRID, sealed=_fixed(1168, 2)),
        ),
    )


def _bundle(c: _Corpus, i: int) -> bytes:
    manifest = Manifest.decode(c.manifests[i])
    sections = [
        c.keyring,
        c.keyring_sig,
        c.manifests[i],
        c.signatures[i],
        encode_envelopes(list(c.envelopes)),
    ]
    return _frame_bundle(sections, _fixed(manifest.payload_size, i))


def _frame_bundle(sections: Sequence[bytes], payload: bytes) -> bytes:
    names = ("keyring", "keyring_sig", "manifest", "signature", "envelopes")
    head = encode_header(
        **{n: len(s) for n, s in zip(names, sections, strict=True)}, payload=len(payload)
    )
    return b"".join([head, *sections, payload])


def _bundle_inner(data: bytes) -> tuple[list[bytes], Callable[[list[bytes]], bytes]]:
    r = BundleReader(
        lambda off, n: data[off : off + n], file_size=len(data), max_payload=MAX_BUNDLE_PAYLOAD
    )
    names = ("keyring", "keyring_sig", "manifest", "signature", "envelopes")
    parts = [r.section(n) for n in names]
    payload = r.section("payload")
    return parts, lambda new: _frame_bundle(new, payload)


def decode_bundle(data: bytes) -> tuple[object, ...]:
    """An ``.efb`` file's sections, each decoded (what ``install_file`` reads, verification
    aside)."""
    r = BundleReader(
        lambda off, n: data[off : off + n], file_size=len(data), max_payload=MAX_BUNDLE_PAYLOAD
    )
    return (
        Keyring.decode(r.section("keyring")),
        Signature.decode(r.section("keyring_sig")),
        Manifest.decode(r.section("manifest")),
        Signature.decode(r.section("signature")),
        *decode_envelopes(r.section("envelopes")),
    )


def _chunk_inner(data: bytes) -> tuple[list[bytes], Callable[[list[bytes]], bytes]]:
    (hlen,) = struct.unpack_from(">H", data, 4)
    body = data[6 + hlen :]
    return [
        data[6 : 6 + hlen]
    ], lambda new: data[:4] + struct.pack(">H", len(new[0]) & 0xFFFF) + new[0] + body


def _fl_inner(data: bytes) -> tuple[list[bytes], Callable[[list[bytes]], bytes]]:
    (n,) = struct.unpack_from(">I", data, 4)
    rest = data[8 + n :]
    return [data[8 : 8 + n]], lambda new: data[:4] + struct.pack(">I", len(new[0])) + new[0] + rest


def _statuses() -> tuple[bytes, ...]:
    active = ActiveModel(
        name="digits", version="1", sequence=3, format="onnx", bundle_id=_fixed(16, 3).hex()
    )
    result = InstallResult(
        ok=False,
        code="signature",
        reason="bad sig",
        time=5,
        sequence=4,
        name="digits",
        model_version="2",
        bundle_id=_fixed(16, 4).hex(),
    )
    progress = DownloadProgress(
        bundle_id=_fixed(16, 4).hex(),
        sequence=4,
        done=1024,
        total=4096,
        reused=1,
        fetched=2,
        requests=3,
        rejected=0,
    )
    return (
        DeviceStatus(device_id="dev-a", time=1_700_000_000, state="idle").encode(),
        DeviceStatus(
            device_id="dev-a",
            time=1_700_000_001,
            state="downloading",
            active=active,
            highest_sequence=3,
            last_result=result,
            progress=progress,
            counter=9,
        ).encode(),
    )


def _http_bodies() -> tuple[bytes, ...]:
    row = [round(0.25 * i, 2) for i in range(64)]
    return (
        json.dumps({"inputs": [row]}).encode(),
        json.dumps({"inputs": row}).encode(),
        json.dumps({"inputs": [row, [float(i) for i in range(64)], [0] * 64]}).encode(),
    )


def _content_length(data: bytes) -> int:
    return content_length(data.decode("latin-1").split("\n"))


def targets() -> tuple[Target, ...]:
    """Every decoder of network or file input, with valid encodings to mutate."""
    c = _corpus()
    offers = tuple(
        ReleaseOffer(
            keyring=c.keyring,
            keyring_sig=c.keyring_sig,
            manifest=m,
            signature=s,
            envelope=c.envelopes[i % 2],
        ).encode()
        for i, (m, s) in enumerate(zip(c.manifests, c.signatures, strict=True))
    )
    bid = _fixed(16, 1).hex()
    chunks = (
        ChunkReply(bundle_id=bid, index=3, corr="c-1", data=_fixed(1040, 5)).encode(),
        ChunkReply(
            bundle_id=bid, index=0, corr="c-2", status="refused", reason="not a target"
        ).encode(),
    )
    requests = (
        ChunkRequest(
            bundle_id=bid, indexes=(0, 1, 2), reply_to="ef/v1/dev/dev-a/chunk", corr="c-1"
        ).encode(),
        ChunkRequest(bundle_id=bid, indexes=tuple(range(16)), reply_to="r", corr="").encode(),
    )
    telemetry = (
        Telemetry(
            device_id="dev-a",
            time=1_700_000_000,
            metrics={
                "p50_us": 6.5,
                "requests": 10,
                "drift": {"psi": [0.1, 0.2]},
                "label": "é",
                "ok": True,
                "none": None,
            },
        ).encode(),
    )
    kem = KemPublicKey(KEM_X25519, _fixed(32, 9))
    device = DevicePublic(device_id="dev-a", sign_public=_key(4).public_raw, kem=kem).encode()
    instruction = fl.seal(
        b"\x0a\x03abc",
        _key(2),
        kind="instruction",
        run_id=1,
        round=2,
        message_id="m-1",
        device_id="dev-a",
        issued_at=1_700_000_000,
        expires=1_700_000_600,
    )
    reply = fl.seal(
        b"",
        _key(4),
        kind="reply",
        run_id=1,
        round=2,
        message_id="m-2",
        reply_to="m-1",
        device_id="dev-a",
        issued_at=1_700_000_000,
        expires=1_700_000_600,
    )
    envs = encode_envelopes(list(c.envelopes))
    return (
        Target(name="offer", decode=ReleaseOffer.decode, refused=_ours, seeds=offers),
        Target(
            name="chunk-frame",
            decode=lambda b: ChunkReply.decode(b, max_data=MAX_CHUNK_DATA),
            refused=_ours,
            seeds=chunks,
            inner=_chunk_inner,
        ),
        Target(name="chunk-request", decode=ChunkRequest.decode, refused=_ours, seeds=requests),
        Target(name="status", decode=DeviceStatus.decode, refused=_ours, seeds=_statuses()),
        Target(name="telemetry", decode=Telemetry.decode, refused=_ours, seeds=telemetry),
        Target(name="manifest", decode=Manifest.decode, refused=_ours, seeds=c.manifests),
        Target(name="keyring", decode=Keyring.decode, refused=_ours, seeds=(c.keyring,)),
        Target(
            name="signature",
            decode=Signature.decode,
            refused=_ours,
            seeds=(c.keyring_sig, *c.signatures),
        ),
        Target(name="envelopes", decode=decode_envelopes, refused=_ours, seeds=(envs,)),
        Target(
            name="bundle-file",
            decode=decode_bundle,
            refused=_ours,
            seeds=tuple(_bundle(c, i) for i in range(len(c.manifests))),
            inner=_bundle_inner,
        ),
        Target(name="device-public", decode=DevicePublic.decode, refused=_ours, seeds=(device,)),
        Target(
            name="public-key",
            decode=decode_public_key,
            refused=_ours,
            seeds=(encode_public_key(_key(1).public_raw),),
        ),
        Target(
            name="fl-frame",
            decode=fl.parse,
            refused=_ours,
            seeds=(instruction, reply),
            inner=_fl_inner,
        ),
        Target(
            name="http-body",
            decode=lambda b: parse_inputs(b, HTTP_SPEC),
            refused=_http_4xx,
            seeds=_http_bodies(),
        ),
        Target(
            name="http-content-length",
            decode=_content_length,
            refused=_http_4xx,
            seeds=(b"0", b"2817", b"16777216", b"12\n12"),
        ),
    )


def run(n: int, seed: int = 0, only: Sequence[str] = ()) -> Report:
    """``n`` generated inputs per target (``only``: those targets), from ``seed``."""
    chosen = [t for t in targets() if not only or t.name in only]
    pool = [s for t in chosen for s in t.seeds]
    for t in chosen:  # the corpus must be valid, or the fuzzer never gets past the first check
        for s in t.seeds:
            if check(t, s) is not True:
                raise RuntimeError(f"fuzz target {t.name}: a seed encoding does not decode")
    inputs: dict[str, int] = {}
    accepted: dict[str, int] = {}
    crashes: list[Crash] = []
    for t in chosen:
        rng = random.Random(f"{seed}:{t.name}")
        ok = 0
        for _ in range(n):
            result = check(t, generate(rng, t.seeds, pool, t.inner))
            if isinstance(result, Crash):
                crashes.append(result)
            elif result:
                ok += 1
        inputs[t.name], accepted[t.name] = n, ok
    return Report(inputs=inputs, accepted=accepted, crashes=tuple(crashes))
