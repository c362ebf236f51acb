"""ahm.bench."""
