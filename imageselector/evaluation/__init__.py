"""Retrieval quality per model and per fusion."""
