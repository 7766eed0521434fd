"""Moving finished images to the backup disk."""
