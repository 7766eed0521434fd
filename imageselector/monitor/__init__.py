"""The supervisor of the four workers, its config and the QPS policy."""
