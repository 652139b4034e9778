"""Checkpoint formats: detection, key maps and loading for every component."""
