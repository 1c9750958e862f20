"""The Flower internals the MQTT transport touches (pinned flwr 1.42): contract tests.

If a Flower upgrade changes any of these, the adapter must be looked at again.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import flwr
import numpy as np
import pytest
from edgefleet.federated import wire
from edgefleet.protocol.errors import DecodeError
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


def train_message(dst: int = 1234) -> Message:
    wire.set_task_identity(42)
    arrays = ArrayRecord([np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(5)])
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1, "server-round": 2}),
                          "m": MetricRecord({"acc": 0.5})})
    msg = Message(content, dst, "train", group_id="2")
    wire.set_message_id(msg, "abc123")
    return msg


def test_flower_is_the_pinned_version() -> None:
    assert flwr.__version__.startswith("1.42."), flwr.__version__


def test_a_real_message_round_trips_bit_identically() -> None:
    msg = train_message()
    data = wire.encode(msg)
    back = wire.decode(data)
    assert wire.encode(back) == data
    md, bmd = msg.metadata, back.metadata
    assert (bmd.message_id, bmd.run_id, bmd.src_node_id, bmd.dst_node_id, bmd.message_type,
            bmd.group_id, bmd.created_at, bmd.ttl) == (
        "abc123", 42, wire.SERVER_NODE_ID, 1234, "train", "2", md.created_at, md.ttl)
    got = back.content["arrays"].to_numpy_ndarrays()
    want = msg.content["arrays"].to_numpy_ndarrays()
    assert all(g.dtype == w.dtype and g.tobytes() == w.tobytes() for g, w in zip(got, want,
                                                                                 strict=True))
    assert back.content["config"]["lr"] == 0.1


def test_message_reads_the_process_global_task_identity() -> None:
    wire.set_task_identity(7, node_id=wire.SERVER_NODE_ID, task_id=3)
    msg = Message(RecordDict(), 99, "evaluate")
    assert (msg.metadata.run_id, msg.metadata.src_node_id, msg.metadata.src_task_id) == (7, 1, 3)
    assert (TaskIdentity.run_id, TaskIdentity.node_id) == (7, 1)


def test_a_clientapp_reply_keeps_the_instruction_in_its_metadata() -> None:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)

    msg = train_message(dst=555)
    ctx = Context(run_id=42, node_id=555, node_config={}, state=RecordDict(), run_config={})
    reply = app(msg, ctx)
    md = reply.metadata
    assert (md.reply_to_message_id, md.src_node_id, md.dst_node_id, md.run_id, md.message_id) == (
        "abc123", 555, wire.SERVER_NODE_ID, 42, "")
    wire.set_message_id(reply, "r1")
    assert wire.decode(wire.encode(reply)).metadata.message_id == "r1"


def test_grid_has_the_abstract_members_the_adapter_implements() -> None:
    assert Grid.__abstractmethods__ == {
        "set_run", "run", "create_message", "get_node_ids", "push_messages", "pull_messages",
        "send_and_receive",
    }


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"", b"\x0a\x02\x08"])
def test_garbage_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        wire.decode(data)


def test_fl_topics_are_under_the_device_subtree() -> None:
    assert wire.instruction_topic("dev-1") == "ef/v1/dev/dev-1/fl"
    assert wire.reply_topic("dev-1") == "ef/v1/dev/dev-1/up/fl"
    assert wire.REPLY_FILTER == "ef/v1/dev/+/up/fl"
    with pytest.raises(ValueError):
        wire.instruction_topic("+")


def test_an_idle_client_with_fl_configured_does_not_import_flower() -> None:
    code = textwrap.dedent("""
        import sys
        from edgefleet.agent import daemon  # the agent's daemon module, as `agent run` loads it
        from edgefleet.federated.client import FlClient
        from edgefleet.protocol.keys import SigningKey

        def factory():
            raise AssertionError("the ClientApp is made only when an instruction verified")

        client = FlClient(lambda t, p: None, device_id="dev-1", identity=SigningKey.generate(),
                          trusted_keys=lambda: None, client_app=factory, opted_in=True)
        client.handle(b"EFL1 not a valid frame at all" + bytes(80))  # rejected before Flower
        assert client.wait_handled(1, timeout=10)
        assert client.counts["rejected:malformed"] == 1, client.counts
        client.stop()
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("flwr", "sklearn", "grpc", "google"))
        print(heavy)
        assert not heavy, heavy
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-500:]
    assert out.stdout.strip() == "[]"
