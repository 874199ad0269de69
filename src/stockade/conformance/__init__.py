"""Conformance cases (the format of shared/conformance/FORMAT.md) and their runner."""
