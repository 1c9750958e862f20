"""A candidate release: a model that runs beside the active one and is never made active.

A manifest with a ``candidate`` field (``CandidateSpec``) is a candidate release. The field
is part of the signed manifest, not of the topic it arrives on or of the unsigned offer, so
neither a broker nor anyone relaying the offer can turn an ordinary release into a candidate
or a candidate into something the device activates: the agent installs a candidate only into
its candidate slot and refuses it as an ordinary release, and the reverse (see
``edgefleet.agent.candidate``). How it runs is signed with it:

    mode "shadow"  sees sampled live inputs off the request path; never answers a request
    mode "ab"      answers ``share`` of the requests (chosen by a keyed hash of the input)

Promotion is an ordinary (new, signed) release of the same model; dropping is an empty
retained message on the device's candidate topic (``topics.cmd(id) + "/candidate"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import _fields as F
from .errors import DecodeError

__all__ = ["CANDIDATE_MODES", "CandidateSpec", "candidate_topic"]

CANDIDATE_MODES = ("shadow", "ab")


def candidate_topic(cmd_topic: str) -> str:
    """The retained candidate offer's topic below a device's ``cmd`` topic (devices may read
    ``cmd/#``, so no ACL change is needed)."""
    return f"{cmd_topic}/candidate"


@dataclass(frozen=True, kw_only=True)
class CandidateSpec:
    mode: str  # "shadow" | "ab"
    share: float = 0.0  # ab: fraction of requests the candidate answers, in [0, 1]

    def __post_init__(self) -> None:
        if self.mode not in CANDIDATE_MODES:
            raise DecodeError(
                f"manifest.candidate.mode: expected one of {CANDIDATE_MODES}, saw {self.mode!r:.20}"
            )
        share = self.share
        if isinstance(share, bool) or not isinstance(share, int | float):
            raise DecodeError("manifest.candidate.share: expected a number")
        if not (math.isfinite(share) and 0.0 <= share <= 1.0):
            raise DecodeError(f"manifest.candidate.share: expected 0..1, saw {share!r:.20}")
        if self.mode == "shadow" and share != 0:
            raise DecodeError("manifest.candidate.share: a shadow answers no request (share 0)")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "share": float(self.share)}

    @classmethod
    def from_dict(cls, d: object) -> CandidateSpec:
        w = "manifest.candidate"
        if not isinstance(d, dict):
            raise DecodeError(f"{w}: expected an object")
        F.check_keys(d, {"mode", "share"}, w)
        share = d.get("share", 0.0)
        if isinstance(share, bool) or not isinstance(share, int | float):
            raise DecodeError(f"{w}.share: expected a number")
        return cls(mode=F.field(d, "mode", str, w), share=float(share))
