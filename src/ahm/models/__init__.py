"""ahm.models."""
