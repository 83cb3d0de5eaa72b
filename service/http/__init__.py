"""HTTP routes; each module owns one concern."""
