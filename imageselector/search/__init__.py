"""Ensemble search over the five image indexes and the two listing-text indexes: CLI, web page, index cache."""
