"""EdgeFleet: shared I/O adapters below agent and coordinator (imports only protocol)."""
