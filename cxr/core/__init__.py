"""Shared foundations: typed params, constants, one-line errors, atomic file writes, provenance."""
