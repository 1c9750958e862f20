"""EdgeFleet: edgefleet."""
