"""EdgeFleet: deploy signed, encrypted ML models to edge devices and train them there.

The folders agent/, coordinator/, protocol/, infra/, models/ and simulations/ install as
edgefleet.<folder>; this package itself is the composition root (CLI, demo, progress).
It imports nothing, so importing edgefleet.protocol stays pure.
"""
