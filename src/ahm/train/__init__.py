"""ahm.train."""
