"""Flower messages larger than one FL frame, over the in-memory broker: a >1 MB model goes
out chunked and comes back chunked, bit-identically; memory for reassembly is bounded on both
sides; a forged chunk is rejected and the round goes on without it."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from edgefleet.federated import wire  # noqa: E402
from edgefleet.federated.client import FlClient  # noqa: E402
from edgefleet.federated.grid import MqttGrid  # noqa: E402
from edgefleet.infra.link import InMemoryBroker, MessageProps, MqttConfig  # noqa: E402
from edgefleet.protocol import fl, flchunk  # noqa: E402
from edgefleet.protocol.keys import SigningKey  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from .test_grid import KEYRING, RELEASE, WAIT, _config, _publisher  # noqa: E402

BIG = np.random.default_rng(0).standard_normal((400, 500)).astype(np.float32)  # 800 kB
MORE = np.random.default_rng(1).standard_normal((300_000,))  # float64: 2.4 MB


def digest(arrays: list[np.ndarray]) -> list[str]:
    return [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays]


@dataclass
class Device:
    seen: list[list[str]] = field(default_factory=list)  # digests of the arrays received
    sent: list[list[np.ndarray]] = field(default_factory=list)

    def app(self) -> ClientApp:
        app = ClientApp()

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            arrays = msg.content["arrays"].to_numpy_ndarrays()
            self.seen.append(digest(arrays))
            out = [a * 3 - 1 for a in arrays]  # a different >1 MB reply
            self.sent.append(out)
            return Message(RecordDict({"arrays": ArrayRecord(out)}), reply_to=msg)

        return app


@dataclass
class Rig:
    grid: MqttGrid
    client: FlClient
    device: Device
    tamper: list[bool]  # set [True] to flip a byte in the next instruction chunk on the wire


@contextmanager
def rig(**grid_kw: Any) -> Iterator[Rig]:
    key = SigningKey.generate()
    device = Device()
    tamper = [False]
    with InMemoryBroker() as broker:
        holder: list[Any] = []
        clink = broker.link(MqttConfig(url=broker.url, client_id="coordinator"),
                            lambda t, p, m: holder[0].on_message(t, p, m))  # fmt: skip
        grid = MqttGrid(clink, signer=RELEASE, device_keys=lambda d: key.public_raw,
                        devices=lambda: ["dev-0"], round_timeout=grid_kw.pop("timeout", WAIT),
                        **grid_kw)  # fmt: skip
        holder.append(grid)
        clink.subscribe(wire.REPLY_FILTER)
        box: list[FlClient] = []

        def on_device(topic: str, payload: bytes, props: MessageProps) -> None:
            if tamper[0] and flchunk.is_chunk(payload):
                tamper[0] = False
                payload = payload[:-1] + bytes([payload[-1] ^ 1])
            box[0].handle(payload)

        dlink = broker.link(MqttConfig(url=broker.url, client_id="dev-0"), on_device)
        dlink.subscribe(wire.instruction_topic("dev-0"))
        box.append(FlClient(_publisher(dlink), device_id="dev-0", identity=key,
                            trusted_keys=lambda: KEYRING, client_app=device.app(),
                            opted_in=True))  # fmt: skip
        clink.start()
        dlink.start()
        try:
            assert clink.wait_connected(WAIT) and dlink.wait_connected(WAIT)
            yield Rig(grid=grid, client=box[0], device=device, tamper=tamper)
        finally:
            box[0].stop()
            dlink.stop()
            clink.stop()


def train_message(grid: MqttGrid, arrays: list[np.ndarray]) -> Message:
    (node,) = grid.get_node_ids()
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "config": _config(1)}), node,
                   "train")  # fmt: skip


def test_a_model_over_1_mb_round_trips_bit_identically_both_ways() -> None:
    with rig() as r:
        r.grid.start_run(3)
        arrays = [BIG, MORE]
        msg = train_message(r.grid, arrays)
        assert len(wire.encode(msg)) > 3 * fl.MAX_PAYLOAD  # really chunked
        (reply,) = r.grid.send_and_receive([msg])
        assert r.device.seen == [digest(arrays)]  # the instruction, bit for bit
        got = reply.content["arrays"].to_numpy_ndarrays()
        assert digest(got) == digest(r.device.sent[0])  # the reply, bit for bit
        s = r.grid.stats
        assert (s.replies, s.rejected, s.timed_out) == (1, {}, 0)
        assert s.bytes_sent > 3_200_000 and s.bytes_received > 3_200_000
        assert r.grid._chunks.held() == 0 and r.client._chunks.held() == 0  # all released


def test_a_forged_chunk_is_rejected_by_the_device_and_the_round_goes_on() -> None:
    with rig() as r:
        r.grid.start_run(4)
        r.tamper[0] = True
        r.grid.push_messages([train_message(r.grid, [BIG, MORE])])
        assert r.client.wait_handled(1, WAIT)
        assert r.client.counts["rejected:integrity"] == 1 and r.device.seen == []
        (reply,) = r.grid.send_and_receive([train_message(r.grid, [BIG])])  # the next works
        assert r.device.seen == [digest([BIG])]
        assert r.client._chunks.held() == 0


def test_the_device_bounds_what_it_reassembles() -> None:
    with rig() as r:
        r.client._chunks.max_bytes_per_key = r.client._chunks.max_bytes = 1 << 20  # 1 MiB
        r.grid.start_run(5)
        r.grid.push_messages([train_message(r.grid, [BIG, MORE])])
        assert r.client.wait_handled(1, WAIT)
        assert r.client.counts["rejected:too_large"] == 1 and r.device.seen == []
        assert r.client._chunks.held() == 0  # and none of its chunks was buffered


def test_the_coordinator_bounds_what_it_reassembles_per_device() -> None:
    with rig(max_reply_bytes_per_device=1 << 20) as r:
        r.grid.start_run(6)
        r.grid.push_messages([train_message(r.grid, [BIG, MORE])])
        assert r.client.wait_handled(1, WAIT)
        assert r.client.counts["replied"] == 1
        tick = threading.Event()
        for _ in range(int(WAIT * 20)):  # until the link thread has seen the reply's header
            if r.grid.stats.rejected.get("too_large"):
                break
            tick.wait(0.05)
        assert r.grid.stats.rejected.get("too_large") == 1, r.grid.stats
        assert r.grid._chunks.held() == 0 and r.grid.stats.replies == 0
