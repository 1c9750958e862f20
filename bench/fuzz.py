"""Decoder fuzz run: >= 100,000 generated inputs over every network and file decoder, 0 crashes.

``edgefleet.simulations.fuzz`` feeds each decoder (release offer, chunk frame, chunk request,
status, telemetry, manifest, keyring, signature, envelopes, ``.efb`` bundle file, device and
public key files, FL frame, the HTTP API's body and Content-Length parsers) 7,000 inputs
(quick: 300) mutated from fixed valid encodings with a fixed seed, so every run sees the same
inputs. A crash is any exception that is not one of ours (``EdgeFleetError``; a 4xx
``HttpError`` for HTTP), or a decoded value that does not encode again. Reported: inputs per
decoder (with how many decoded), crashes (aim 0), and inputs/s including generation (for
information: no baseline, the figure only shows the run stays cheap enough for ``make bench``).
"""

from __future__ import annotations

import time

from ._util import Row

NAME = "fuzz"
SEED = 1
_NOTES: list[str] = []


def notes() -> list[str]:
    return list(_NOTES)


def run(quick: bool) -> list[Row]:
    from edgefleet.simulations import fuzz

    _NOTES.clear()
    per_target = 300 if quick else 7000
    t0 = time.perf_counter()
    report = fuzz.run(per_target, seed=SEED)
    seconds = time.perf_counter() - t0
    crashes: dict[str, int] = {}
    for c in report.crashes:
        crashes[c.target] = crashes.get(c.target, 0) + 1
    for c in report.crashes[:20]:
        _NOTES.append(f"crash {c.target}: {c.error} at {c.where}; input {c.input[:100]!r}")
    rows = [
        Row(key="inputs", metric="generated inputs, all decoders", value=report.total,
            unit="inputs", aim=None if quick else ">= 100000", note=f"seed {SEED}"),
        Row(key="crashes", metric="crashes (not our error, or no re-encode)",
            value=len(report.crashes), unit="crashes", aim="== 0"),
        Row(key="inputs_per_s", metric="inputs per second, generation included",
            value=report.total / seconds, unit="inputs/s"),
    ]
    for name, n in report.inputs.items():
        rows.append(Row(key=f"inputs:{name}", metric=f"{name}: inputs", value=n, unit="inputs",
                        note=f"{report.accepted[name]} decoded, {crashes.get(name, 0)} crashed"))
    return rows
