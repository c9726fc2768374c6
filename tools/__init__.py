"""Maintenance commands for the repository (not installed with the package)."""
