"""EdgeFleet: coordinator."""
