"""Loaded models: one base, thin wrappers per family, the one decode loop, `load`."""
