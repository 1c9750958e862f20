"""The decoder fuzz run (simulations.fuzz): a fixed-seed sample here, the full run when slow.

Property: every decoder of network or file input returns a value that encodes again, or
raises one of our errors (``EdgeFleetError``; a 4xx ``HttpError`` for the HTTP API). The
regression table holds what the fuzzer found on main, each case with its own error.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from edgefleet.agent.http import HttpError
from edgefleet.protocol.errors import DecodeError
from edgefleet.protocol.keyring import Signature
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ChunkReply, ChunkRequest, DeviceStatus, Telemetry
from edgefleet.simulations import fuzz
from edgefleet.simulations._fuzzcases import generate

REQUIRED = {  # issue 7: offer, chunk frame, status, telemetry, chunk request, bundle file, HTTP
    "offer", "chunk-frame", "status", "telemetry", "chunk-request", "bundle-file", "manifest",
    "keyring", "signature", "envelopes", "http-body", "http-content-length",
}  # fmt: skip


def _explain(report: fuzz.Report) -> str:
    return "\n".join(
        f"{c.target}: {c.error} at {c.where}; input {c.input[:120]!r}" for c in report.crashes[:10]
    )


def test_every_decoder_is_a_target() -> None:
    names = [t.name for t in fuzz.targets()]
    assert REQUIRED <= set(names) and len(names) == len(set(names))


def test_sample_has_no_crashes() -> None:
    report = fuzz.run(300, seed=0)
    assert report.total == 300 * len(fuzz.targets()) >= 4000
    assert report.crashes == (), _explain(report)
    assert all(n > 0 for n in report.accepted.values()), report.accepted  # not only refusals


@pytest.mark.slow
def test_full_run_has_no_crashes() -> None:
    report = fuzz.run(7000, seed=1)
    assert report.total >= 100_000
    assert report.crashes == (), _explain(report)


def test_generation_is_deterministic() -> None:
    (target,) = [t for t in fuzz.targets() if t.name == "chunk-frame"]

    def draw(seed: int) -> list[bytes]:
        rng = random.Random(seed)
        return [generate(rng, target.seeds, target.seeds, target.inner) for _ in range(200)]

    assert draw(5) == draw(5) != draw(6)
    assert len(set(draw(5))) > 150  # and varied


def _raise_key_error(data: bytes) -> object:
    table: dict[bytes, object] = {}
    return table[data]


def _http_500(data: bytes) -> object:
    raise HttpError(500, "a bug")


def _undecodable_again(data: bytes) -> object:
    return ChunkRequest(bundle_id="0" * 32, indexes=(1,), reply_to="r", corr="\ud800")


@pytest.mark.parametrize(
    "decode,refused,error",
    [
        (_raise_key_error, fuzz._ours, "KeyError: b'x'"),
        (_http_500, fuzz._http_4xx, "HttpError: a bug"),  # a 5xx is not a refusal
        (_undecodable_again, fuzz._ours, "UnicodeEncodeError: "),  # decodes, cannot re-encode
    ],
)
def test_a_crash_is_reported(
    decode: Callable[[bytes], object], refused: Callable[[Exception], bool], error: str
) -> None:
    target = fuzz.Target(name="t", decode=decode, refused=refused, seeds=(b"x",))
    crash = fuzz.check(target, b"x")
    assert isinstance(crash, fuzz.Crash) and crash.input == b"x" and crash.target == "t"
    assert crash.error.startswith(error), crash.error


def _swap(data: bytes, old: str, new: str) -> bytes:
    text = data.decode()
    assert old in text
    return text.replace(old, new, 1).encode()


BID = "0" * 32
REQUEST = ChunkRequest(bundle_id=BID, indexes=(1,), reply_to="r", corr="c-1").encode()
REPLY = ChunkReply(bundle_id=BID, index=1, corr="c-1", status="refused", reason="no").encode()
STATUS = DeviceStatus(device_id="dev-a", time=1, state="idle").encode()
TELEMETRY = Telemetry(device_id="dev-a", time=1, metrics={"m": "v"}).encode()
SIGNATURE = Signature(keyid="k", sig=b"\0" * 64).encode()
MANIFEST = fuzz._manifest(1, 1024, 3000).encode()


# Found by the fuzzer on main: each decoded, then could not be encoded again (a lone surrogate
# escape, a number beyond float64 turned into inf) -- the coordinator echoes corr and reason
# back and stores status and telemetry text.
@pytest.mark.parametrize(
    "decode,data,phrase",
    [
        (ChunkRequest.decode, _swap(REQUEST, '"c-1"', '"\\ud800"'), "lone surrogate"),
        (
            lambda b: ChunkReply.decode(b, max_data=0),
            REPLY[:4] + len(_swap(REPLY[6:], '"no"', '"\\udfff"')).to_bytes(2, "big")
            + _swap(REPLY[6:], '"no"', '"\\udfff"'),
            "lone surrogate",
        ),
        (DeviceStatus.decode, _swap(STATUS, '"active":null', '"active":{"name":"a","version":"1",'
                                    '"sequence":1,"format":"\\ud800","bundle_id":"b"}'),
         "lone surrogate"),
        (Telemetry.decode, _swap(TELEMETRY, '"v"', '"\\ud800x"'), "lone surrogate"),
        (Signature.decode, _swap(SIGNATURE, '"k"', '"\\uDBFF"'), "lone surrogate"),
        (Manifest.decode, _swap(MANIFEST, '"n":10', '"n":1e400'), "out of the float64 range"),
    ],
    ids=["chunkreq.corr", "chunk.reason", "status.active", "telemetry", "signature", "manifest"],
)  # fmt: skip
def test_found_by_the_fuzzer(decode: Callable[[bytes], object], data: bytes, phrase: str) -> None:
    with pytest.raises(DecodeError, match=phrase):
        decode(data)


def test_valid_surrogate_pairs_still_decode() -> None:
    got = Telemetry.decode(_swap(TELEMETRY, '"v"', '"\\ud83d\\ude00"'))
    assert got.metrics == {"m": "\U0001f600"}
    assert Telemetry.decode(got.encode()) == got
