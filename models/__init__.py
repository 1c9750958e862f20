"""EdgeFleet: models."""
