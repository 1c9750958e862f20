"""Simulated fleets (many agents, faults, non-IID data) for tests and demos.

Reserved: the in-process fleets used so far live in ``tests/integration/fleet.py`` and
``bench/delivery.py``; they move here with the federated-learning work.
"""
