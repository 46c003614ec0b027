"""Integrations with other libraries (each imported lazily, in one file)."""
