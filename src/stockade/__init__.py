"""stockade: container network isolation and NetworkPolicy enforcement on Linux."""

__version__ = "0.1.0"
