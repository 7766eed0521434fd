"""Upgrading a home built by the original pipeline (IMAC_OPERATIONS.md before this project) in place."""
