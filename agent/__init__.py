"""EdgeFleet: agent."""
