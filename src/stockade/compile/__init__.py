"""Compilation: resolved policy -> a backend-neutral ruleset -> datapath renderings."""
