"""ahm.data."""
