"""EdgeFleet: simulations."""
