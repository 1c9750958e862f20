"""Federated learning over the fleet link: Flower's Message API carried over MQTT.

Layer: imports ``protocol``, ``infra``, ``models`` and ``coordinator``; ``simulations`` and the
CLI import it; ``agent`` and ``coordinator`` never do (the composition root wires it in).
Nothing here imports ``flwr`` at package import time: an idle agent stays light.

- ``grid.MqttGrid`` (coordinator side): a ``flwr.serverapp.Grid`` over the link port.
- ``client.FlClient`` (device side): verifies instructions, runs the ClientApp on its own
  thread, signs and publishes replies.
- ``wire``: Flower's own serde for one ``Message``.
- ``native.run_native``: the same apps on Flower's own SuperLink/SuperNodes (the baseline).
"""
