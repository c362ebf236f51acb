"""ahm.eval."""
