"""Simulated fleets for tests, ``bench/`` and the demo: one rig, any broker.

- ``homes``: fleet set-up on disk (coordinator, enrolled agent homes, broker credentials).
- ``brokers``: the in-memory broker, an embedded mosquitto/amqtt, or an external one.
- ``fleet``: ``open_fleet`` -> a ``Fleet`` of a coordinator service and N agents, with
  observers (``ObservedDaemon``, ``ChunkGate``, ``Checkpoints``) and faults (drop, delay,
  disconnect, kill, broker restart).
- ``wait``: ``wait_until``.
"""
