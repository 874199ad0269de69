"""The policy model: pure data, parsing, defaulting and validation."""
