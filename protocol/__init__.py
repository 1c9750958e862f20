"""EdgeFleet: protocol."""
