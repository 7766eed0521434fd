"""Tools that prove the pipeline works: demo, chaos harness, consistency check."""
